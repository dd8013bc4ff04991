"""pgweb schema 2: items (id serial, name text NOT NULL, note text NOT NULL DEFAULT '').

Migration ``0002-add-note`` (expand) adds ``note`` to a schema-1 table: release 1's code still works on it
(it names its columns and the default fills ``note``). The app creates schema 2 on an empty database.
"""

SCHEMA = 2
COLUMNS = {"id": "integer", "name": "text", "note": "text"}
GONE = ()
CREATE = ["CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, name text NOT NULL, "
          "note text NOT NULL DEFAULT '')"]
LIST = "SELECT id, name, note FROM items ORDER BY id"
GET = "SELECT id, name, note FROM items WHERE id = %s"


def problem(columns: dict[str, str]) -> str | None:
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        return (f"table items lacks {', '.join(missing)} (has {', '.join(sorted(columns))}): "
                f"not schema {SCHEMA} or a compatible later one (migration 0002-add-note has not run, "
                f"or a contract migration of a later release has)")
    return None


def item(row: tuple) -> dict:
    return {"id": row[0], "name": row[1], "note": row[2]}


def insert(doc: object) -> tuple[str, tuple]:
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not doc["name"]:
        raise ValueError('POST /items takes {"name": "...", "note": "..."}')
    note = doc.get("note", "")
    if not isinstance(note, str):
        raise ValueError("note must be a string")
    return "INSERT INTO items (name, note) VALUES (%s, %s) RETURNING id, name, note", (doc["name"], note)


def sample(text: str) -> dict:
    return {"name": text, "note": "note " + text}
