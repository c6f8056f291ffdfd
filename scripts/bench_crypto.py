"""The cost of encryption at rest: durable publish, the LMDB pipeline, and the DuckDB replay at start.

    .venv/bin/python scripts/bench_crypto.py            # 3 interleaved runs of each, on and off
    .venv/bin/python scripts/bench_crypto.py --quick    # small counts, one run

Encryption on and off run in the same process, alternately (``MEMBUS_ENCRYPTION`` reaches the temporary
homes of scripts/bench.py through the environment), and the medians are compared. Key files of the
temporary homes go to a temporary config folder, never to ``~/.config``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench  # noqa: E402
import bench_raw  # noqa: E402

from bus.client import Bus  # noqa: E402


def with_encryption(on: bool, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    before = os.environ.get("MEMBUS_ENCRYPTION")
    os.environ["MEMBUS_ENCRYPTION"] = "1" if on else "0"
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["MEMBUS_ENCRYPTION"]
        else:
            os.environ["MEMBUS_ENCRYPTION"] = before


def compare(name: str, fn: Callable[[], dict[str, Any]], key: str, runs: int) -> dict[str, Any]:
    """Alternates off/on runs (so drift of the machine hits both) and reports the medians and the cost."""
    values: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(runs):
        for on in (False, True):
            values[on].append(float(with_encryption(on, fn)[key]))
    off, with_on = statistics.median(values[False]), statistics.median(values[True])
    return {"benchmark": name, "metric": key, "off": off, "on": with_on, "off_runs": values[False],
            "on_runs": values[True], "cost_percent": round(100.0 * (off - with_on) / off, 1)}


def duckdb_replay(events: int) -> dict[str, Any]:
    """Seconds for a fresh (in-memory, encrypted) DuckDB worker to replay ``events`` logged requests."""
    with bench.system() as home, Bus.connect(home, module="bench-replay") as bus:
        pending = [bus.publish_nowait("working.message.append.request",
                                      {"conversation_id": f"c{i % 100}", "user_id": "u1", "role": "user",
                                       "text": "m" * 200}, timeout=120) for i in range(events)]
        for p in pending:
            p.result(120)
        head = bus.status()["head"]
        env = {**os.environ, "MEMBUS_LOG_LEVEL": "warning"}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bus", "worker", "duckdb", "--home", str(home)],
                                env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 600
            while _acked(bus, "duckdb") < head:
                if time.monotonic() > deadline:
                    raise RuntimeError("duckdb did not catch up")
                time.sleep(0.05)
            seconds = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(30)
        return {"events": events, "log_head": head, "seconds_to_caught_up": seconds,
                "events_per_s": head / seconds, "includes": "worker process start and DuckDB open"}


def _acked(bus: Bus, group: str) -> int:
    state = bus.status()["groups"].get(group) or {}
    return int(state.get("acked") or state.get("floor") or 0)


def run(quick: bool, runs: int) -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    m = 5_000 if quick else 20_000
    return {
        "machine": bench_raw.machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "durable_publish_1": compare("durable publish, 1 publisher", lambda: bench.durable_publish(1, n),
                                     "msgs_per_s", runs),
        "store_pipeline_lmdb": compare("LMDB pipeline (request -> store -> .complete)",
                                       lambda: bench.store_pipeline("lmdb", m), "req_per_s", runs),
        "duckdb_replay": with_encryption(True, lambda: duckdb_replay(m)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, one run")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="membus-bench-keys-") as config:
        os.environ["XDG_CONFIG_HOME"] = config  # key files of the temporary homes
        result = run(args.quick, 1 if args.quick else args.runs)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
