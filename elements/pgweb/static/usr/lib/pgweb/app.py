#!/usr/bin/python3
"""pgweb: a small HTTP app on PostgreSQL, behind nginx. The HTTP layer every release shares.

Listens on 127.0.0.1 (``[http] port``, 8000); nginx proxies port 80 and 443 to it. Each request opens its
own connection over PostgreSQL's socket (peer authentication as the system user ``pgweb``), so the app
starts before the database, survives its restarts, and answers 503 meanwhile.

    GET    /health      200 {"status": "ok", ...} only when the database answers and holds this release's
                        schema; 503 otherwise, with the reason
    GET    /items       200 {"items": [...]} ordered by id
    POST   /items       JSON object -> 201 the stored item
    GET    /items/ID    200 the item, 404
    DELETE /items/ID    204, 404

The schema is the release's own module ``pgweb_schema`` (next to this file). On an empty database the app
creates the release's schema; it never migrates one: imageupdate runs the release's migrations.
"""
import configparser
import json
import os
import signal
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgweb_schema as schema  # noqa: E402  (the release's schema: columns, SQL)

CONFIG = os.environ.get("PGWEB_CONFIG", "/etc/pgweb/pgweb.conf")


def release() -> str:
    try:
        with open("/etc/imageupdate/release.json") as f:
            return json.load(f)["release"]
    except (OSError, ValueError, KeyError):
        return "unknown"


class Unavailable(Exception):
    """The database does not answer, or holds a schema this release cannot use."""


class Database:
    def __init__(self, name: str, socket_dir: str) -> None:
        self.dsn = f"dbname={name} host={socket_dir} connect_timeout=3 application_name=pgweb"
        self.create_lock = threading.Lock()

    def connect(self):  # -> psycopg2 connection, schema checked
        try:
            conn = psycopg2.connect(self.dsn)
        except psycopg2.Error as e:
            raise Unavailable(f"database: {str(e).strip().splitlines()[0]}") from e
        try:
            self._check(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def columns(cur) -> dict[str, str]:
        cur.execute("SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name = 'items'")
        return dict(cur.fetchall())

    def _check(self, conn) -> None:
        with conn.cursor() as cur:
            cols = self.columns(cur)
            if not cols:
                with self.create_lock:  # an empty database (a new node): this release's schema
                    for sql in schema.CREATE:
                        cur.execute(sql)
                    conn.commit()
                    print(f"created schema {schema.SCHEMA}", flush=True)
                    cols = self.columns(cur)
        conn.commit()
        problem = schema.problem(cols)
        if problem:
            raise Unavailable(f"schema: {problem}")


class Handler(BaseHTTPRequestHandler):
    db: Database

    def _json(self, code: int, doc: object) -> None:
        body = b"" if code == 204 else (json.dumps(doc) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _item_id(self) -> int | None:
        rest = self.path[len("/items/"):] if self.path.startswith("/items/") else ""
        return int(rest) if rest.isdigit() else None

    def _run(self, work) -> None:
        try:
            conn = self.db.connect()
        except Unavailable as e:
            self._json(503, {"status": "unavailable", "release": release(), "reason": str(e)})
            return
        try:
            with conn, conn.cursor() as cur:
                code, doc = work(cur)
        except psycopg2.Error as e:
            code, doc = 503, {"status": "unavailable", "reason": f"database: {str(e).strip().splitlines()[0]}"}
        finally:
            conn.close()
        self._json(code, doc)

    def do_GET(self) -> None:
        if self.path == "/health":
            def health(cur):
                cur.execute("SELECT current_setting('server_version')")
                return 200, {"status": "ok", "release": release(), "schema": schema.SCHEMA,
                             "postgresql": cur.fetchone()[0]}
            self._run(health)
        elif self.path in ("/items", "/items/"):
            def items(cur):
                cur.execute(schema.LIST)
                return 200, {"items": [schema.item(r) for r in cur.fetchall()]}
            self._run(items)
        elif self._item_id() is not None:
            def one(cur):
                cur.execute(schema.GET, (self._item_id(),))
                row = cur.fetchone()
                return (200, schema.item(row)) if row else (404, {"error": "no such item"})
            self._run(one)
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path not in ("/items", "/items/"):
            self._json(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            doc = json.loads(self.rfile.read(length) or b"null")
            sql, params = schema.insert(doc)
        except (ValueError, TypeError) as e:
            self._json(400, {"error": str(e)})
            return

        def insert(cur):
            cur.execute(sql, params)
            return 201, schema.item(cur.fetchone())
        self._run(insert)

    def do_DELETE(self) -> None:
        item_id = self._item_id()
        if item_id is None:
            self._json(404, {"error": "not found"})
            return

        def delete(cur):
            cur.execute("DELETE FROM items WHERE id = %s", (item_id,))
            return (204, {}) if cur.rowcount else (404, {"error": "no such item"})
        self._run(delete)

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks socket.getfqdn(), a DNS lookup that stalls on a node without a
        # resolver: bind without it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def wait_for_database(db: Database) -> None:
    """At start: connect until the database answers (it may start after the app), so an empty database
    gets this release's schema at once rather than at the first request."""
    said = None
    while True:
        try:
            db.connect().close()
            print("database ready", flush=True)
            return
        except Unavailable as e:
            if str(e) != said:
                print(f"waiting for the database: {e}", flush=True)
                said = str(e)
        time.sleep(1)


def main() -> None:
    config = configparser.ConfigParser()
    config.read(CONFIG)
    Handler.db = Database(config.get("database", "name", fallback="pgweb"),
                          config.get("database", "socket_dir", fallback="/run/postgresql"))
    port = config.getint("http", "port", fallback=8000)
    server = Server(("127.0.0.1", port), Handler)
    threading.Thread(target=wait_for_database, args=(Handler.db,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"pgweb {release()} schema {schema.SCHEMA} on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
