"""The broker and the workers freeze their start-up heap, so a full collection walks only what came after."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading

from bus.consistency import make_runtime
from tests.conftest import BrokerProcess, wait_until
from tests.workers_util import REPO, WorkerProcess, child_env
from workers.runtime import read_worker_status


def test_frozen_heap_is_out_of_the_full_collections_sight() -> None:
    script = """
import gc, json
from bus.heap import freeze_startup_heap
startup = [[i] for i in range(50_000)]
before = len(gc.get_objects(generation=2))
frozen = freeze_startup_heap()
later = [[i] for i in range(10)]
print(json.dumps({"before": before, "frozen": frozen, "old_after": len(gc.get_objects(generation=2)),
                  "startup_alive": len(startup), "collected_after": gc.collect()}))
"""
    out = subprocess.run([sys.executable, "-c", script], env=child_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["frozen"] >= 50_000
    assert seen["old_after"] < seen["before"] - 50_000  # the 50,000 lists are frozen, not in the oldest generation
    assert seen["startup_alive"] == 50_000  # frozen is not freed


def _frozen(log: str, event: str) -> int:
    for line in log.splitlines():
        if line.startswith("{") and json.loads(line).get("event") == event:
            return int(json.loads(line)["objects"])
    return 0


def test_broker_and_workers_freeze_their_startup_heap_and_thaw_it_to_stop(broker: BrokerProcess) -> None:
    workers = [WorkerProcess(broker.home.path, name).start() for name in ("lmdb", "duckdb")]
    try:
        # Modules, classes and open stores: tens of thousands of objects a full collection no longer walks.
        wait_until(lambda: _frozen(broker.log_path.read_text(), "broker.heap_frozen") > 10_000,
                   what="the broker's heap frozen")
        for worker in workers:
            wait_until(lambda w=worker: _frozen(w.log_tail(100_000), "worker.heap_frozen") > 10_000,
                       what=f"the {worker.name} worker's heap frozen")
    finally:
        for worker in workers:
            assert worker.stop() == 0, worker.log_tail()
    # Left frozen at exit, duckdb's objects were never collected and its bindings printed pages of leak warnings.
    assert "leaked" not in workers[1].log_tail(100_000)


def test_a_worker_run_in_a_host_process_leaves_its_heap_alone(broker: BrokerProcess) -> None:
    """``membus rebuild`` runs a worker runtime in a thread of its own process: that heap is not the worker's."""
    runtime = make_runtime("lmdb", broker.home)
    before = gc.get_freeze_count()
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: read_worker_status(broker.home).get("lmdb", {}).get("pid") == os.getpid(),
                   what="the worker runtime consuming")
    finally:
        runtime.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert gc.get_freeze_count() == before
