"""The garbage collector in the long-running processes (the broker, the workers).

CPython's full collection walks every container object alive, most of them there since start-up (modules,
classes, the store's and the model's objects): 15-40 ms in the broker and the LMDB worker, a pause in the
middle of a delivery every few seconds under load. Frozen, those objects are out of the collector's sight:
it walks only what was made since (docs/benchmarks.md, twelfth pass).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collects once, then freezes what is left; call when start-up is over. Returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Gives the frozen objects back to the collector; call before the process exits. Left frozen, the last
    collection at exit skips them, and native modules that check for leaks then (duckdb's nanobind) print
    pages of "leaked instance" warnings at every stop."""
    gc.unfreeze()
