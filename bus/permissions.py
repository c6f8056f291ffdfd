"""Per-module topic permissions, enforced by the broker.

``<home>/permissions.toml``::

    [default]                      # modules not listed below (without it: nothing)
    publish = ["app.>"]
    subscribe = ["app.>"]

    [modules.companion]
    publish = ["conversation.>", "memory.>", "working.>"]
    subscribe = [">"]

A module may publish a topic that one of its ``publish`` patterns matches, and subscribe to (or join a
group with, or replay) a pattern that one of its ``subscribe`` patterns covers. Workers (``worker-<name>``
of a worker that exists) are trusted by default: they must publish replies and change events. The file is
re-read when it changes.

Without the file everything is allowed. With it, what it does not grant is refused: a module not listed gets
``[default]``, which grants nothing when it is missing, and a right a module's table leaves out is the one of
``[default]``. And a store's change events (``published_by`` in the contracts catalog: ``memory.fact.changed``,
``conversation.message.changed``, ...) are published by workers only, whatever a module's patterns say: a
module granted ``memory.>`` could otherwise make Chroma index a fact that libSQL does not hold. Likewise the
``.complete`` and ``.failed`` replies to the requests a worker handles (``handled_by``): else a module granted
``memory.>`` could answer another module's request as the store. And a module may not publish a message id
of the form of a worker's (``worker_id_taken``).

A file that cannot be read as such rules (broken TOML, a pattern that is not one) keeps the broker from
starting (``check``). Edited into such a state while the broker runs, the rules read last stay in force and
``status`` shows the error (``error``).
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from contracts.catalog import load_all
from contracts.errors import BusError
from contracts.registry import spec_for
from contracts.topics import COMPLETE, FAILED, REQUEST, check_pattern, matches

log = structlog.get_logger("membus.permissions")

ALL = (">",)
_WORKER_ID = re.compile(r"W[0-9A-F]{20}(?:[0-9A-F]{16})?\Z")
"""Both forms of ``workers.apply.derived_id``: hashed (20 digits) and ordered by seq (36)."""


@dataclass(frozen=True)
class Grant:
    publish: tuple[str, ...] = ALL
    subscribe: tuple[str, ...] = ALL


def covers(allowed: str, requested: str) -> bool:
    """Whether every topic ``requested`` can match is matched by ``allowed``."""
    a, r = allowed.split("."), requested.split(".")
    for i, seg in enumerate(a):
        if seg == ">":
            return len(r) > i
        if i >= len(r) or r[i] == ">":
            return False
        if seg != "*" and (r[i] == "*" or seg != r[i]):
            return False
    return len(a) == len(r)


class Permissions:
    def __init__(self, path: Path) -> None:
        load_all()  # which topics are a store's change events
        self.path = path
        self._mtime: float | None = None
        self.default = Grant()
        self.modules: dict[str, Grant] = {}
        self.configured = False
        self.error = ""
        """Why the file as it is now could not be read ("" when it could); the rules read before stay."""

    def check(self) -> None:
        """Reads the file now; raises BusError if it cannot be read as rules (the broker does not start)."""
        self._reload()
        if self.error:
            raise BusError(self.error, path=str(self.path))

    def refresh(self) -> None:
        """Reads the file again if it changed (the broker does so every second: ``status`` shows a broken edit
        without waiting for traffic)."""
        self._reload()

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self.default, self.modules, self.configured, self._mtime, self.error = Grant(), {}, False, None, ""
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            data = tomllib.loads(self.path.read_text())
            modules = data.get("modules", {})
            if not isinstance(modules, dict):
                raise BusError("[modules] is not a table of modules")
            default = _grant(data.get("default", {}), "[default]", Grant((), ()))
            grants = {name: _grant(g, f"[modules.{name}]", default) for name, g in modules.items()}
        except (OSError, tomllib.TOMLDecodeError, BusError) as exc:
            self.error = f"{self.path} cannot be read as permissions: {getattr(exc, 'message', exc)}"
            log.error("permissions.unreadable", path=str(self.path), error=self.error,
                      in_force="the rules read before" if self.configured else "none: nothing is allowed")
            if not self.configured:  # never read: closed, not open
                self.default, self.modules, self.configured = Grant((), ()), {}, True
            return
        self.default, self.modules, self.configured, self.error = default, grants, True, ""

    def grant(self, module: str) -> Grant:
        self._reload()
        if module in self.modules:
            return self.modules[module]
        if is_worker(module) or module == "broker":
            return Grant()
        return self.default

    def may_publish(self, module: str, topic: str) -> bool:
        grant = self.grant(module)
        if self.configured and not is_worker(module):
            spec = spec_for(topic)
            if spec is not None and spec.published_by:  # a store's change event: only its worker can tell it
                return False
            if answers_a_worker(topic):  # else a module could answer another's request as the store
                return False
        return any(matches(p, topic) for p in grant.publish)

    def worker_id_taken(self, module: str, ids: Iterable[str]) -> str | None:
        """The first of ``ids`` a module may not publish: a worker's message ids (``workers.apply.derived_id``)
        follow from the log seq they answer, and a module that took one first would make the broker drop the
        worker's reply or change event as a duplicate of it."""
        if not self.configured or is_worker(module):  # the file is read again every second (``refresh``)
            return None
        return next(filter(_WORKER_ID.match, ids), None)

    def may_subscribe(self, module: str, pattern: str) -> bool:
        return any(covers(p, pattern) for p in self.grant(module).subscribe)


def answers_a_worker(topic: str) -> bool:
    """Whether ``topic`` is the ``.complete`` or ``.failed`` reply to a request the catalog has a worker handle."""
    base, _, kind = topic.rpartition(".")
    if kind not in (COMPLETE, FAILED):
        return False
    spec = spec_for(f"{base}.{REQUEST}")
    return spec is not None and bool(spec.handled_by)


def is_worker(module: str) -> bool:
    """Whether ``module`` is the name a store worker connects under (``worker-<name>`` of a worker that exists):
    any other name starting ``worker-`` is a module like the others."""
    return module.startswith("worker-") and module.removeprefix("worker-") in _workers(
        os.environ.get("MEMBUS_EXTRA_BACKENDS", ""))


@functools.lru_cache(maxsize=4)
def _workers(extra: str) -> frozenset[str]:
    from workers.registry import backends

    return frozenset(backends())


def _grant(data: Any, where: str, otherwise: Grant) -> Grant:
    """The rights a table grants; a right it leaves out is ``otherwise``'s."""
    if not isinstance(data, dict):
        raise BusError(f"{where} is not a table")
    lists = {key: data.get(key, list(getattr(otherwise, key))) for key in ("publish", "subscribe")}
    for key, value in lists.items():
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise BusError(f"{where} {key} is not a list of topic patterns")
    try:
        return Grant(*(tuple(check_pattern(p) for p in lists[key]) for key in ("publish", "subscribe")))
    except BusError as exc:
        raise BusError(f"{where}: {exc.message}") from None
