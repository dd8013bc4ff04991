"""The ephemeral Heat process of a local site: engine and API in one process.

Heat 25+ ships no ``heat-all``; ``oslo.service`` would fork the engine, and the ``fake://`` transport only
carries messages inside one process. So this process starts ``EngineService`` in-process (threads), serves
the noauth paste API on loopback with a threaded WSGI server, and writes ``heat.json`` (pid, port) once the
API answers. SIGTERM stops the API, then the engine, and exits; the service SIGKILLs it after a bound.

SQLite under Heat's threads fails with "database is locked" on deferred transactions: every transaction
here starts with ``BEGIN IMMEDIATE`` and waits on a busy timeout (measured: no lock errors left).

Run as ``python -m imageupdate.heat.server --config-file SITE/heat/heat.conf --port N --state FILE``.
"""

from __future__ import annotations

# The backend must be chosen before anything imports oslo_service.service.
import os  # isort: skip

from oslo_service import backend  # isort: skip

backend.init_backend(backend.BackendType.THREADING)

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socketserver  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server  # noqa: E402

import sqlalchemy  # noqa: E402
from sqlalchemy import event  # noqa: E402

# Every transaction takes the write lock (BEGIN IMMEDIATE): they queue, one at a time. Creating a 200-node
# fleet's stack starts 200 resources at once, and each of their transactions loads the whole stack, about
# one a second: the last in the queue waited past 60 s and the stack failed with "database is locked"
# (measured). A wait in this queue is work to come, not a deadlock: it is bounded like Heat's own RPC.
SQLITE_BUSY_MS = 600_000
# Heat steps every resource action (create, update, delete, wait condition checks) once a second. On a local
# site a step costs microseconds and a node's whole swap about 0.1 s, so the ephemeral Heat steps faster.
STEP_SECONDS = float(os.environ.get("IMAGEUPDATE_HEAT_STEP", "0.2"))
LEAF_PAUSE = float(os.environ.get("IMAGEUPDATE_HEAT_LEAF_PAUSE", "0.02"))
ENGINE_STOP_BOUND = 20.0


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    if type(dbapi_conn).__module__.startswith("sqlite3"):
        dbapi_conn.isolation_level = None  # oslo.db sets this too: BEGIN is emitted by the listeners
        dbapi_conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
        dbapi_conn.execute("PRAGMA journal_mode = WAL")


def _sqlite_begin(conn: Any) -> None:
    # oslo.db emits a plain (deferred) BEGIN unless a transaction is marked as begun: take the write lock
    # up front instead, so two threads never both hold a read lock and then both ask to write.
    if conn.dialect.name == "sqlite" and "in_transaction" not in conn.info:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.info["in_transaction"] = True


def _tune_steps(seconds: float) -> None:
    from heat.engine import scheduler

    call = scheduler.TaskRunner.__call__
    defaults = list(call.__defaults__ or ())
    if defaults and defaults[0] == 1:  # (wait_time=1, timeout=None, progress_callback=None, post_func=None)
        defaults[0] = seconds
        call.__defaults__ = tuple(defaults)


class _LeafPacing:
    """Stands in for the ``time`` module inside ``heat.engine.stack``, whose only use of it is the pause
    ``converge_stack`` makes after triggering each leaf of the graph (1 s, to spread the work over many
    engine workers). This Heat has one in-process engine: the pause only delays, by a second per leaf,
    and every gate handle and every cleanup of the previous chain is a leaf (measured: 20 s before the
    first node of a 30-node rollout started)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _pace_leaves(seconds: float) -> None:
    from heat.engine import stack

    stack.time = _LeafPacing(seconds)


def _prune_finished_threads() -> None:
    """Heat 27's per-stack ThreadGroup (threading backend) appends every thread it starts and never drops
    finished ones, and refuses new threads past 1000: after about 1000 events on one stack in one engine
    process, every resource step fails with "Maximum number of threads reached" and the stack hangs in
    UPDATE_IN_PROGRESS (measured: a 30-node site, third rollout). Drop finished threads before the count."""
    from heat.engine import service as engine_service

    original = engine_service.ThreadGroup.add_thread

    def add_thread(self: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.threads[:] = [t for t in self.threads if t.is_alive()]
        return original(self, func, *args, **kwargs)

    engine_service.ThreadGroup.add_thread = add_thread


def _begin_immediate() -> None:
    """From here on every new SQLite connection starts its transactions with BEGIN IMMEDIATE."""
    event.listen(sqlalchemy.engine.Engine, "connect", _sqlite_connect)
    event.listen(sqlalchemy.engine.Engine, "begin", _sqlite_begin)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def address_string(self) -> str:  # no reverse DNS: it stalls without a resolver
        return str(self.client_address[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imageupdate-heat")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", required=True)
    args = parser.parse_args(argv)

    from heat import version
    from heat.common import config, messaging
    from heat.db import api as db_api
    from heat.db import migration
    from heat.engine import service as engine_service
    from heat.rpc import api as rpc_api
    from oslo_config import cfg
    from oslo_log import log as logging

    conf = cfg.CONF
    logging.register_options(conf)
    conf(args=["--config-file", args.config_file], project="heat", prog="heat-engine",
         version=version.version_info.version_string(), default_config_files=[])
    logging.setup(conf, "heat")
    config.set_config_defaults()
    messaging.setup()
    config.startup_sanity_check()
    migration.db_sync()  # alembic manages its own transactions: patch only after it
    db_api.get_engine().dispose()
    _begin_immediate()

    _tune_steps(STEP_SECONDS)
    _pace_leaves(LEAF_PAUSE)
    _prune_finished_threads()
    engine = engine_service.EngineService(conf.host, rpc_api.ENGINE_TOPIC)
    engine.start()
    app = config.load_paste_app("heat-api")
    httpd = make_server("127.0.0.1", args.port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)

    stopping = threading.Event()

    def _stop(_signum: int, _frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    state = Path(args.state)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": args.port, "started": time.time(),
                               "engine_id": engine.engine_id}) + "\n")
    os.replace(tmp, state)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
        stopper = threading.Thread(target=engine.stop, daemon=True)
        stopper.start()
        stopper.join(ENGINE_STOP_BOUND)
        state.unlink(missing_ok=True)
    os._exit(0)  # engine threads are daemonless; the engine state is in SQLite


if __name__ == "__main__":
    sys.exit(main())
