"""Which workers exist: name -> the backend class that owns that store.

``MEMBUS_EXTRA_BACKENDS="name=package.module:Class,..."`` adds workers (or replaces one) without editing
this table: a plugin's store, or a test's backend that must run in a real worker process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from workers.base import Backend

BACKENDS = {
    "lmdb": "workers.lmdb:LmdbBackend",
    "libsql": "workers.libsql:LibsqlBackend",
    "chroma": "workers.chroma:ChromaBackend",
    "duckdb": "workers.duckdb:DuckdbBackend",
}


def backends() -> dict[str, str]:
    """BACKENDS plus the ones ``MEMBUS_EXTRA_BACKENDS`` names."""
    table = dict(BACKENDS)
    for item in filter(None, (i.strip() for i in os.environ.get("MEMBUS_EXTRA_BACKENDS", "").split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or path.count(":") != 1:
            raise ValueError(f"MEMBUS_EXTRA_BACKENDS: {item!r} is not name=package.module:Class")
        table[name.strip()] = path.strip()
    return table


def load(name: str) -> type[Backend]:
    table = backends()
    try:
        path = table[name]
    except KeyError:
        raise KeyError(f"unknown worker {name!r}; known: {', '.join(table)}") from None
    module, cls = path.split(":")
    backend: type[Backend] = getattr(importlib.import_module(module), cls)
    return backend


def available() -> list[str]:
    """The workers whose code is present (a worker that fails to import is reported, not hidden)."""
    out = []
    for name, path in backends().items():
        module = path.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def register_contracts() -> None:
    """Imports every present worker, so each topic's contract is in the catalog."""
    for name in available():
        load(name)
