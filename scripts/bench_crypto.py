"""The cost of encryption at rest: durable publish, the LMDB pipeline, and the DuckDB replay at start.

    .venv/bin/python scripts/bench_crypto.py                   # 3 interleaved runs of each, on and off
    .venv/bin/python scripts/bench_crypto.py --quick           # small counts, one run
    .venv/bin/python scripts/bench_crypto.py --only lmdb --runs 5

Encryption on and off run in the same process, alternately (``MEMBUS_ENCRYPTION`` reaches the temporary
homes of scripts/bench.py through the environment), and the medians are compared. The LMDB pipeline also
reports the CPU time per request of the broker, the worker and the requester (from ``/proc``), which other
jobs on the machine disturb much less than the wall-clock rate. Key files of the temporary homes go to a
temporary config folder (``bench.temporary_config``), never to ``~/.config``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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
    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(runs):
        for on in (False, True):
            results[on].append(with_encryption(on, fn))
    values = {on: [float(r[key]) for r in rs] for on, rs in results.items()}
    off, with_on = statistics.median(values[False]), statistics.median(values[True])
    out = {"benchmark": name, "metric": key, "off": off, "on": with_on, "off_runs": values[False],
           "on_runs": values[True], "cost_percent": round(100.0 * (off - with_on) / off, 1)}
    if "cpu_us_per_request" in results[False][0]:
        cpu = {on: {proc: round(statistics.median(r["cpu_us_per_request"][proc] for r in rs), 1)
                    for proc in rs[0]["cpu_us_per_request"]} for on, rs in results.items()}
        out["cpu_us_per_request"] = {"off": cpu[False], "on": cpu[True],
                                     "on_minus_off": {p: round(cpu[True][p] - cpu[False][p], 1) for p in cpu[True]}}
    return out


def store_pipeline_cpu(worker: str, count: int, window: int = 2000) -> dict[str, Any]:
    """scripts/bench.py's ``store_pipeline`` (the same requests and window), plus the CPU time per request of
    each process, read from /proc before the first request and after the last reply."""
    with bench.system((worker,)) as home, Bus.connect(home, module="bench-req") as bus:
        before = _cpu_seconds()
        pending: list[Any] = []
        t0 = time.perf_counter()
        for i in range(count):
            topic, payload = bench._store_request(worker, i)
            pending.append(bus.request_nowait(topic, payload, timeout=120))
            if len(pending) >= window:
                for p in pending[: window // 2]:
                    p.result(120)
                del pending[: window // 2]
        for p in pending:
            p.result(120)
        seconds = time.perf_counter() - t0
        after = _cpu_seconds()
    cpu = {proc: round((after[proc] - before[proc]) / count * 1e6, 1) for proc in after}
    return {"worker": worker, "requests": count, "req_per_s": count / seconds, "window": window,
            "cpu_us_per_request": cpu}


def _cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds of this process (the requester) and of its children (broker, worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    me = os.times()
    out = {"requester": me.user + me.system}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == os.getpid():
            out["broker" if b"broker" in cmdline else "worker"] = (int(stat[11]) + int(stat[12])) / tick
    return out


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


PARTS = ("publish", "lmdb", "duckdb")


def run(quick: bool, runs: int, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    m = 5_000 if quick else 20_000
    out: dict[str, Any] = {"machine": bench_raw.machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "load_average_at_start": os.getloadavg()}
    if "publish" in parts:
        out["durable_publish_1"] = compare("durable publish, 1 publisher", lambda: bench.durable_publish(1, n),
                                           "msgs_per_s", runs)
    if "lmdb" in parts:
        out["store_pipeline_lmdb"] = compare("LMDB pipeline (request -> store -> .complete)",
                                             lambda: store_pipeline_cpu("lmdb", m), "req_per_s", runs)
    if "duckdb" in parts:
        out["duckdb_replay"] = with_encryption(True, lambda: duckdb_replay(m))
    out["load_average_at_end"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, one run")
    ap.add_argument("--runs", type=int, default=3, help="off/on pairs of each comparison (default 3)")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    args = ap.parse_args()
    result = run(args.quick, 1 if args.quick else args.runs, tuple(args.only or PARTS))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
