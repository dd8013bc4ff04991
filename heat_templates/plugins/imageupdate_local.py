"""ImageUpdate::Local::Server: a node of an imageupdate local site, as a Heat resource.

Loaded by the site's ephemeral Heat from ``plugin_dirs``; ``environments/local.yaml`` maps the abstract
``ImageUpdate::Server`` to it. Creating or updating the resource rebuilds the node from its release with
``imageupdate site rebuild --json`` (a child process in its own session, so a Heat killed mid-rebuild leaves the
node to finish on one release; the rebuild itself is idempotent). The child is told it runs for the site's
open operation (``--by-heat``): an operator's rebuild is refused while an operation is open, Heat's is the
operation's own step. Deleting the resource leaves the node alone: nodes belong to the site, the stack only
says which release each one runs. It handles no signals: the gate after it does. What it reads of the child
is the JSON contract, never its wording: the node's status document on success, the error document (stdout)
on failure; rebuild.log (stderr) only when the child died before writing one.
"""

import json
import os
import signal
import subprocess
import sys
import time

from heat.common import exception
from heat.engine import attributes, properties, resource, support

STEP_WAIT = 5.0  # seconds a check blocks on the rebuild; Heat looks for cancellation between checks
HEADER = "--- rebuild "  # how each rebuild's part of rebuild.log begins


def error_document(out):
    """The child's ``--json`` error document on stdout (the contract: ``error``, ``message``, ``exit_code``,
    ``node``, ``release``, ``step``; imageupdate/base/errors.py), or None if it died before writing one."""
    try:
        doc = json.loads(out)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("message"), str) and "error" in doc else None


def rebuild_failure(returncode, node, release, site, said, out=""):
    """One line saying why the rebuild of ``node`` failed: its exit status and its ``--json`` error document
    (``out``, its stdout); only if it wrote none (it died first), ``said``, the non-blank lines it wrote to
    rebuild.log after this rebuild's header."""
    recover = f"'imageupdate site recover --site {site}' finishes the node on one release"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"rebuild of {node} to {release} was killed ({name}); {recover}"
    doc = error_document(out)
    if doc is not None:
        last = doc["message"]
    elif not said or said[-1].startswith(HEADER):
        return f"rebuild of {node} to {release} ended with exit status {returncode} without saying why; {recover}"
    else:
        last = said[-1]
    return last if node in last else f"rebuild of {node} to {release} failed: {last}"


def log_since(log, offset):
    """The non-blank lines of rebuild.log from ``offset`` on (what the child wrote to stderr)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return []


class LocalServer(resource.Resource):
    support_status = support.SupportStatus(version="27.0.0")

    PROPERTIES = (NAME, RELEASE, OPTIONS) = ("name", "release", "options")
    ATTRIBUTES = (NODE, RELEASE_ATTR, ADDRESS, REBUILD_STARTED, REBUILD_FINISHED, PHASES) = (
        "node", "release", "address", "rebuild_started", "rebuild_finished", "phases")

    properties_schema = {
        NAME: properties.Schema(properties.Schema.STRING, "Node name in the site.", required=True),
        RELEASE: properties.Schema(properties.Schema.STRING, "Release the node runs.", required=True,
                                   update_allowed=True),
        OPTIONS: properties.Schema(properties.Schema.MAP, "Backend options: site and store directories.",
                                   default={}, update_allowed=True),
    }
    attributes_schema = {
        NODE: attributes.Schema("Node name.", type=attributes.Schema.STRING),
        RELEASE_ATTR: attributes.Schema("Release the node runs.", type=attributes.Schema.STRING),
        ADDRESS: attributes.Schema("The node's address on the site bridge.", type=attributes.Schema.STRING),
        REBUILD_STARTED: attributes.Schema("When the last rebuild started (seconds since the epoch).",
                                           type=attributes.Schema.STRING),
        REBUILD_FINISHED: attributes.Schema("When the last rebuild ended with the node answering.",
                                            type=attributes.Schema.STRING),
        PHASES: attributes.Schema("When the last rebuild stopped the node, switched its tree, started it, and "
                                  "saw it answer (JSON: seconds since the epoch).", type=attributes.Schema.STRING),
    }

    def _rebuild(self, release):
        opts = self.properties[self.OPTIONS] or {}
        site, store = opts.get("site"), opts.get("store")
        if not site or not store:
            raise exception.Error("ImageUpdate::Local::Server needs options.site and options.store")
        node = self.properties[self.NAME]
        log = os.path.join(site, "nodes", node, "rebuild.log")
        out = open(log, "ab")  # noqa: SIM115 - handed to the child
        try:
            started = time.time()
            out.write(f"{HEADER}{node} to {release} (heat resource {self.name})\n".encode())
            out.flush()
            offset = out.tell()  # what the child says starts here
            cmd = [sys.executable, "-m", "imageupdate", "site", "rebuild", node, release,
                   "--site", site, "--store", store, "--json", "--wait-lock", "600", "--by-heat"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True)
        finally:
            out.close()
        self.data_set("rebuild_pid", str(proc.pid))
        self.data_set("rebuild_started", repr(started))
        return (proc, node, release, log, site, offset)

    def _done(self, handle):
        proc, node, release, log, site, offset = handle
        try:
            proc.wait(timeout=STEP_WAIT)
        except subprocess.TimeoutExpired:
            return False
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        if proc.returncode != 0:
            said = [] if error_document(out) is not None else log_since(log, offset)
            raise exception.Error(rebuild_failure(proc.returncode, node, release, site, said, out))
        try:
            status = json.loads(out)
        except ValueError:
            status = {}
        self.data_set("address", status.get("address", ""))
        self.data_set("release", release)
        self.data_set("rebuild_finished", repr(time.time()))
        self.data_set("phases", json.dumps(status.get("phases") or {}))
        return True

    def handle_create(self):
        self.resource_id_set(self.properties[self.NAME])
        return self._rebuild(self.properties[self.RELEASE])

    def check_create_complete(self, handle):
        return self._done(handle)

    def handle_update(self, json_snippet, tmpl_diff, prop_diff):
        if self.RELEASE not in prop_diff and self.OPTIONS not in prop_diff:
            return None
        self.properties = json_snippet.properties(self.properties_schema, self.context)
        return self._rebuild(self.properties[self.RELEASE])

    def check_update_complete(self, handle):
        return True if handle is None else self._done(handle)

    def handle_delete(self):
        return None  # the node stays; see the module docstring

    def _resolve_attribute(self, name):
        if name == self.NODE:
            return self.properties[self.NAME]
        if name == self.RELEASE_ATTR:
            return self.data().get("release", self.properties[self.RELEASE])
        if name == self.ADDRESS:
            return self.data().get("address", "")
        if name in (self.REBUILD_STARTED, self.REBUILD_FINISHED, self.PHASES):
            return self.data().get(name, "")
        return None

    def get_reference_id(self):
        return self.resource_id or self.physical_resource_name()


def resource_mapping():
    return {"ImageUpdate::Local::Server": LocalServer}
