"""pgweb schema 3: items (id serial, title text NOT NULL, note text NOT NULL DEFAULT '').

Migration ``0003-name-to-title`` (contract) renames ``name`` to ``title``: release 2's code no longer works
on the result (its /health answers 503 naming the missing column). The app creates schema 3 on an empty
database. The API takes ``title`` (``name`` is still accepted on POST) and returns ``title``.
"""

SCHEMA = 3
COLUMNS = {"id": "integer", "title": "text", "note": "text"}
GONE = ("name",)
CREATE = ["CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, title text NOT NULL, "
          "note text NOT NULL DEFAULT '')"]
LIST = "SELECT id, title, note FROM items ORDER BY id"
GET = "SELECT id, title, note FROM items WHERE id = %s"


def problem(columns: dict[str, str]) -> str | None:
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        return (f"table items lacks {', '.join(missing)} (has {', '.join(sorted(columns))}): "
                f"not schema {SCHEMA} (migration 0003-name-to-title has not run)")
    return None


def item(row: tuple) -> dict:
    return {"id": row[0], "title": row[1], "note": row[2]}


def insert(doc: object) -> tuple[str, tuple]:
    title = doc.get("title", doc.get("name")) if isinstance(doc, dict) else None
    if not isinstance(title, str) or not title:
        raise ValueError('POST /items takes {"title": "...", "note": "..."}')
    note = doc.get("note", "")
    if not isinstance(note, str):
        raise ValueError("note must be a string")
    return "INSERT INTO items (title, note) VALUES (%s, %s) RETURNING id, title, note", (title, note)


def sample(text: str) -> dict:
    return {"title": text, "note": "note " + text}
