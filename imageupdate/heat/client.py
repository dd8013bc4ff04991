"""The few Heat calls imageupdate makes, through python-heatclient, as small typed values.

A local site talks to its ephemeral Heat under noauth behind the site's secret (``site.fleet``); a cloud
fleet hands in its keystoneauth session (``cloud.fleet``). Every heatclient error becomes a ``HeatError``
naming the call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageupdate.base.errors import OperationError


class HeatError(OperationError):
    """A Heat API call failed."""


class StackNotFound(HeatError):
    pass


@dataclass(frozen=True)
class Stack:
    id: str
    name: str
    action: str
    status: str  # IN_PROGRESS | COMPLETE | FAILED
    reason: str
    outputs: dict[str, Any]
    description: str = ""

    @property
    def state(self) -> str:
        return f"{self.action}_{self.status}"


@dataclass(frozen=True)
class ResourceState:
    name: str
    type: str
    action: str
    status: str
    reason: str
    physical_id: str

    @property
    def state(self) -> str:
        return f"{self.action}_{self.status}"


@dataclass(frozen=True)
class Event:
    id: str
    resource: str
    state: str
    reason: str
    time: str
    type: str = ""
    physical_id: str = ""


def _event(e: Any) -> Event:
    return Event(e.id, e.resource_name, e.resource_status, e.resource_status_reason or "", e.event_time,
                 getattr(e, "resource_type", "") or "", getattr(e, "physical_resource_id", "") or "")


@contextmanager
def _calling(what: str) -> Iterator[None]:
    from heatclient import exc

    try:
        yield
    except exc.HTTPNotFound as e:
        raise StackNotFound(f"{what}: not found ({_said(e)})", step="heat") from None
    except exc.CommunicationError:
        raise HeatError(f"{what} failed: Heat does not answer", step="heat") from None
    except exc.BaseException as e:
        raise HeatError(f"{what} failed: {_said(e)}", step="heat") from None
    except OSError as e:
        raise HeatError(f"{what} failed: Heat does not answer ({e})", step="heat") from None
    except Exception as e:  # noqa: BLE001 - requests/keystoneauth connection errors have no common root
        raise HeatError(f"{what} failed: {type(e).__name__}: {e}", step="heat") from None


def _said(e: Exception) -> str:
    text = str(getattr(e, "error", None) or e)
    return " ".join(text.split())[:400]


class HeatClient:
    def __init__(self, endpoint: str, session: Any = None, token: str = "noauth") -> None:
        """A cloud's Heat through a Keystone ``session``; a local Heat by ``endpoint`` and its site's secret
        as ``token`` (``imageupdate.heat.secret``)."""
        from heatclient import client

        if session is not None:
            self._hc = client.Client("1", session=session)
        else:
            self._hc = client.Client("1", endpoint=endpoint, token=token, timeout=60)
        self.endpoint = endpoint
        self._names: dict[str, str] = {}  # stack id -> name

    def _ref(self, stack_id: str) -> str:
        """NAME/ID: Heat answers a bare id with a redirect to it, doubling every call of the watch."""
        name = self._names.get(stack_id)
        return f"{name}/{stack_id}" if name and "/" not in stack_id else stack_id

    def stack(self, name: str) -> Stack | None:
        from heatclient import exc

        try:
            # outputs unresolved: resolving them makes Heat load every resource of the stack, and the watch
            # reads the stack several times a second (at 50 nodes that was 57 % of Heat's CPU)
            s = self._hc.stacks.get(self._ref(name), resolve_outputs=False)
        except exc.HTTPNotFound:
            return None
        except exc.CommunicationError:
            raise HeatError(f"reading stack {name} failed: Heat does not answer at {self.endpoint}",
                            step="heat") from None
        except Exception as e:  # noqa: BLE001
            raise HeatError(f"reading stack {name} failed: {_said(e)}", step="heat") from None
        outputs = {o["output_key"]: o.get("output_value") for o in (getattr(s, "outputs", None) or [])}
        self._names[s.id] = s.stack_name
        return Stack(s.id, s.stack_name, s.action, s.status, s.stack_status_reason or "", outputs,
                     getattr(s, "description", "") or "")

    def create(self, name: str, template: dict[str, Any], environment: dict[str, Any],
               files: dict[str, str], timeout_mins: int) -> str:
        with _calling(f"creating stack {name}"):
            r = self._hc.stacks.create(stack_name=name, template=template, environment=environment, files=files,
                                       disable_rollback=True, timeout_mins=timeout_mins)
        self._names[str(r["stack"]["id"])] = name
        return str(r["stack"]["id"])

    def update(self, stack_id: str, template: dict[str, Any], environment: dict[str, Any],
               files: dict[str, str], timeout_mins: int) -> None:
        with _calling(f"updating stack {stack_id}"):
            self._hc.stacks.update(self._ref(stack_id), template=template, environment=environment, files=files,
                                   disable_rollback=True, timeout_mins=timeout_mins, existing=False)

    def template(self, stack_id: str) -> dict[str, Any]:
        with _calling(f"reading the template of stack {stack_id}"):
            return dict(self._hc.stacks.template(self._ref(stack_id)))

    def resources(self, stack_id: str) -> dict[str, ResourceState]:
        with _calling(f"listing the resources of stack {stack_id}"):
            items = self._hc.resources.list(self._ref(stack_id))
        return {r.resource_name: ResourceState(r.resource_name, r.resource_type,
                                               *split_status(r.resource_status), r.resource_status_reason or "",
                                               r.physical_resource_id or "") for r in items}

    def events(self, stack_id: str, marker: str | None = None) -> list[Event]:
        """The stack's own events (not its nested stacks'), oldest first, after ``marker`` if given."""
        with _calling(f"listing the events of stack {stack_id}"):
            kwargs: dict[str, Any] = {"sort_dir": "asc"}
            if marker:
                kwargs["marker"] = marker
            items = self._hc.events.list(self._ref(stack_id), **kwargs)
        return [_event(e) for e in items]

    def last_event(self, stack_id: str) -> Event | None:
        """The stack's newest event: the marker to read what happens after now."""
        with _calling(f"listing the events of stack {stack_id}"):
            items = self._hc.events.list(self._ref(stack_id), sort_dir="desc", limit=1)
        return _event(items[0]) if items else None

    def attributes(self, stack_id: str, resource: str) -> dict[str, Any]:
        with _calling(f"reading {resource}"):
            return dict(getattr(self._hc.resources.get(self._ref(stack_id), resource), "attributes", None) or {})

    def resource_events(self, stack_id: str, resource: str) -> list[Event]:
        with _calling(f"listing the events of {resource}"):
            items = self._hc.events.list(self._ref(stack_id), resource_name=resource)
        return [_event(e) for e in items]

    def signal(self, stack_id: str, resource: str, data: dict[str, Any]) -> None:
        with _calling(f"signalling {resource}"):
            self._hc.resources.signal(self._ref(stack_id), resource, data=data)

    def clear_hook(self, stack_id: str, resource: str, hook: str) -> None:
        with _calling(f"clearing the {hook} hook on {resource}"):
            self._hc.resources.signal(self._ref(stack_id), resource, data={"unset_hook": hook})

    def cancel_update(self, stack_id: str) -> None:
        with _calling(f"cancelling the update of stack {stack_id}"):
            self._hc.actions.cancel_without_rollback(self._ref(stack_id))


_STATUSES = ("IN_PROGRESS", "COMPLETE", "FAILED")


def split_status(status: str) -> tuple[str, str]:
    """``UPDATE_IN_PROGRESS`` -> (``UPDATE``, ``IN_PROGRESS``): the status itself may hold an underscore."""
    for known in _STATUSES:
        if status.endswith("_" + known):
            return status[: -len(known) - 1], known
    action, _, state = status.rpartition("_")
    return action, state


def environment_files(paths: list[Path]) -> tuple[dict[str, str], dict[str, Any]]:
    """Merge environment files as the openstack client does; provider templates they name go in ``files``."""
    from heatclient.common import template_utils

    files, env = template_utils.process_multiple_environments_and_files(env_paths=[str(p) for p in paths])
    return dict(files), dict(env)
