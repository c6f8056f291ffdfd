"""Per-module topic permissions, enforced by the broker.

``<home>/permissions.toml``::

    [default]                      # modules not listed below; without the file, everything is allowed
    publish = ["app.>"]
    subscribe = ["app.>"]

    [modules.companion]
    publish = ["conversation.>", "memory.>", "working.>"]
    subscribe = [">"]

A module may publish a topic that one of its ``publish`` patterns matches, and subscribe to (or join a
group with, or replay) a pattern that one of its ``subscribe`` patterns covers. Workers (``worker-*``)
are trusted by default: they must publish replies and change events. The file is re-read when it changes.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.errors import BusError
from contracts.topics import check_pattern, matches

ALL = (">",)


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
        self.path = path
        self._mtime: float | None = None
        self.default = Grant()
        self.modules: dict[str, Grant] = {}
        self.configured = False

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self.default, self.modules, self.configured, self._mtime = Grant(), {}, False, None
            return
        if mtime == self._mtime:
            return
        data = tomllib.loads(self.path.read_text())
        self.default = _grant(data.get("default", {}), str(self.path))
        self.modules = {name: _grant(g, str(self.path)) for name, g in data.get("modules", {}).items()}
        self.configured, self._mtime = True, mtime

    def grant(self, module: str) -> Grant:
        self._reload()
        if module in self.modules:
            return self.modules[module]
        if module.startswith("worker-") or module == "broker":
            return Grant()
        return self.default

    def may_publish(self, module: str, topic: str) -> bool:
        return any(matches(p, topic) for p in self.grant(module).publish)

    def may_subscribe(self, module: str, pattern: str) -> bool:
        return any(covers(p, pattern) for p in self.grant(module).subscribe)


def _grant(data: dict[str, Any], where: str) -> Grant:
    try:
        pub = tuple(check_pattern(str(p)) for p in data.get("publish", ALL))
        sub = tuple(check_pattern(str(p)) for p in data.get("subscribe", ALL))
    except BusError as exc:
        raise BusError(f"{where}: {exc.message}") from None
    return Grant(pub, sub)
