"""Which workers exist: name -> the backend class that owns that store."""

from __future__ import annotations

import importlib
import importlib.util

from workers.base import Backend

BACKENDS = {
    "lmdb": "workers.lmdb:LmdbBackend",
    "libsql": "workers.libsql:LibsqlBackend",
    "chroma": "workers.chroma:ChromaBackend",
    "duckdb": "workers.duckdb:DuckdbBackend",
}


def load(name: str) -> type[Backend]:
    try:
        path = BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown worker {name!r}; known: {', '.join(BACKENDS)}") from None
    module, cls = path.split(":")
    backend: type[Backend] = getattr(importlib.import_module(module), cls)
    return backend


def available() -> list[str]:
    """The workers whose code is present (a worker that fails to import is reported, not hidden)."""
    out = []
    for name, path in BACKENDS.items():
        module = path.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def register_contracts() -> None:
    """Imports every present worker, so each topic's contract is in the catalog."""
    for name in available():
        load(name)
