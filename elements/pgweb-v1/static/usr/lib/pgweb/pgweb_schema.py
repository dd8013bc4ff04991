"""pgweb schema 1: items (id serial, name text NOT NULL). The app creates it on an empty database."""

SCHEMA = 1
COLUMNS = {"id": "integer", "name": "text"}  # this release's columns and their types
GONE = ()  # columns this release's schema no longer has
CREATE = ["CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, name text NOT NULL)"]
LIST = "SELECT id, name FROM items ORDER BY id"
GET = "SELECT id, name FROM items WHERE id = %s"


def problem(columns: dict[str, str]) -> str | None:
    """Why this release's code cannot run on a table with these columns (None: it can)."""
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        return (f"table items lacks {', '.join(missing)} (has {', '.join(sorted(columns))}): "
                f"not schema {SCHEMA} or a compatible later one")
    return None


def item(row: tuple) -> dict:
    return {"id": row[0], "name": row[1]}


def insert(doc: object) -> tuple[str, tuple]:
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not doc["name"]:
        raise ValueError('POST /items takes {"name": "..."}')
    return "INSERT INTO items (name) VALUES (%s) RETURNING id, name", (doc["name"],)


def sample(text: str) -> dict:
    """An item to post (for the shipped tests)."""
    return {"name": text}
