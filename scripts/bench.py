"""membus benchmarks, side by side with the raw ceilings (and, with --peers, Redis Streams and NATS JetStream).

    .venv/bin/python scripts/bench.py            # full run, writes docs/benchmarks.json and docs/benchmarks.md
    .venv/bin/python scripts/bench.py --quick    # small counts, prints JSON only

Every figure comes from this run on this machine; medians of --runs runs with min and max.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_raw  # noqa: E402

from bus.client import Bus  # noqa: E402
from bus.home import Home  # noqa: E402

PAYLOAD = 256


# -- processes --------------------------------------------------------------------------------------


@contextmanager
def system(workers: tuple[str, ...] = ()) -> Iterator[Path]:
    """A broker (and workers) in a temporary home, always stopped."""
    with tempfile.TemporaryDirectory(prefix="membus-bench-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "MEMBUS_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}
        procs = [subprocess.Popen([sys.executable, "-m", "bus", "broker", "--home", str(home)], env=env,
                                  cwd=ROOT)]
        try:
            deadline = time.monotonic() + 30
            while not Home(home).read_run_file():
                if time.monotonic() > deadline:
                    raise RuntimeError("broker did not start")
                time.sleep(0.02)
            for w in workers:
                procs.append(subprocess.Popen([sys.executable, "-m", "bus", "worker", w, "--home", str(home)],
                                              env=env, cwd=ROOT))
            if workers:
                with Bus.connect(home, module="bench-wait") as b:
                    deadline = time.monotonic() + 120
                    while not all(b.status()["groups"].get(w, {}).get("members") for w in workers):
                        if time.monotonic() > deadline:
                            raise RuntimeError("workers did not join")
                        time.sleep(0.1)
            yield home
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def _publisher(home: str, name: str, count: int, window: int, start: Any, results: Any) -> None:
    data = {"blob": "x" * (PAYLOAD - 16)}
    with Bus.connect(home, module=name) as bus:
        start.wait()
        t0 = time.perf_counter()
        pending: list[Any] = []
        for _ in range(count):
            pending.append(bus.publish_nowait("bench.load.changed", data, timeout=120))
            if len(pending) >= window:
                for p in pending[: window // 2]:
                    p.result(120)
                del pending[: window // 2]
        for p in pending:
            p.result(120)
        results.put((t0, time.perf_counter()))


def durable_publish(publishers: int, count: int) -> dict[str, Any]:
    """N publisher processes, 256-byte payloads, as fast as the client allows; ack = durable (fsync)."""
    ctx = mp.get_context("spawn")
    with system() as home:
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_publisher, args=(str(home), f"pub{i}", count, 20_000, start, results))
                 for i in range(publishers)]
        for p in procs:
            p.start()
        time.sleep(1.5)
        start.set()
        spans = [results.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(30)
        seconds = max(e for _, e in spans) - min(s for s, _ in spans)
        total = publishers * count
        return {"publishers": publishers, "messages": total, "payload_bytes": PAYLOAD, "seconds": seconds,
                "msgs_per_s": total / seconds, "durability": "ack after fsync (LMDB group commit)"}


def publish_latency(count: int) -> dict[str, Any]:
    """One awaited publish at a time: the time from publish() to the durable ack."""
    with system() as home, Bus.connect(home, module="lat") as bus:
        data = {"blob": "x" * (PAYLOAD - 16)}
        for _ in range(100):
            bus.publish("bench.warm.changed", data)
        lat = []
        for _ in range(count):
            t = time.perf_counter()
            bus.publish("bench.lat.changed", data)
            lat.append(time.perf_counter() - t)
        return {"messages": count, **bench_raw.latency_summary(lat)}


def _group_consumer(home: str, count: int, ready: Any, results: Any) -> None:
    with Bus.connect(home, module="bench-consumer") as bus, bus.consume("bench", ["bench.e2e.*"],
                                                                         credit=4000) as c:
        ready.set()
        got, lat = 0, []
        t_first = None
        while got < count:
            batch = c.fetch(2000, timeout=30)
            if not batch:
                break
            now = time.time_ns()
            t_first = t_first or time.perf_counter()
            lat.extend((now - d.message.ts) / 1e9 for d in batch[::10])
            c.ack(batch)
            got += len(batch)
        results.put((got, time.perf_counter(), lat))


def publish_to_group(count: int) -> dict[str, Any]:
    """Publisher process -> broker -> group consumer process with credit and acks."""
    ctx = mp.get_context("spawn")
    with system() as home:
        ready, results = ctx.Event(), ctx.Queue()
        consumer = ctx.Process(target=_group_consumer, args=(str(home), count, ready, results))
        consumer.start()
        ready.wait(60)
        time.sleep(0.5)
        start, pub_results = ctx.Event(), ctx.Queue()
        pub = ctx.Process(target=_publisher_topic, args=(str(home), count, start, pub_results))
        pub.start()
        time.sleep(1.5)
        start.set()
        t0, _ = pub_results.get(timeout=300)
        got, t_end, lat = results.get(timeout=300)
        pub.join(30)
        consumer.join(30)
        return {"messages": got, "msgs_per_s": got / (t_end - t0), **bench_raw.latency_summary(lat)}


def _publisher_topic(home: str, count: int, start: Any, results: Any) -> None:
    data = {"blob": "x" * (PAYLOAD - 16)}
    with Bus.connect(home, module="bench-pub") as bus:
        start.wait()
        t0 = time.perf_counter()
        pending: list[Any] = []
        for _ in range(count):
            pending.append(bus.publish_nowait("bench.e2e.changed", data, timeout=120))
            if len(pending) >= 4000:
                for p in pending[:2000]:
                    p.result(120)
                del pending[:2000]
        for p in pending:
            p.result(120)
        results.put((t0, time.perf_counter()))


# -- store pipelines --------------------------------------------------------------------------------


def _store_request(worker: str, i: int) -> tuple[str, dict[str, Any]]:
    text = "m" * (PAYLOAD - 40)
    if worker == "lmdb":
        return "working.message.append.request", {"conversation_id": f"c{i % 100}", "user_id": "u1",
                                                   "role": "user", "text": text}
    return "conversation.message.append.request", {"conversation_id": f"c{i % 100}", "user_id": "u1",
                                                    "role": "user", "text": text}


def store_pipeline(worker: str, count: int, window: int = 2000) -> dict[str, Any]:
    """Requests -> the worker (batched store transaction) -> .complete back to the requester."""
    with system((worker,)) as home, Bus.connect(home, module="bench-req") as bus:
        pending: list[tuple[float, Any]] = []
        lat: list[float] = []
        t0 = time.perf_counter()
        for i in range(count):
            topic, payload = _store_request(worker, i)
            pending.append((time.perf_counter(), bus.request_nowait(topic, payload, timeout=120)))
            if len(pending) >= window:
                half = window // 2
                for sent, p in pending[:half]:
                    p.result(120)
                    lat.append(time.perf_counter() - sent)
                del pending[:half]
        for sent, p in pending:
            p.result(120)
            lat.append(time.perf_counter() - sent)
        seconds = time.perf_counter() - t0
        return {"worker": worker, "requests": count, "req_per_s": count / seconds, "window": window,
                "latency_under_load": bench_raw.latency_summary(lat)}


def store_latency_at_rate(worker: str, rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop requests at a fixed offered rate; latency from send to the reply's arrival."""
    with system((worker,)) as home, Bus.connect(home, module="bench-rate") as bus:
        total = int(rate * seconds)
        lat: list[float] = []

        def done(sent: float) -> Callable[[Any], None]:
            return lambda _p: lat.append(time.perf_counter() - sent)

        t0 = time.perf_counter()
        i = 0
        while i < total:  # every millisecond, send what is due: sleeping, so the I/O thread keeps the GIL
            due = min(total, int((time.perf_counter() - t0) * rate) + 1)
            while i < due:
                topic, payload = _store_request(worker, i)
                bus.request_nowait(topic, payload, timeout=120).add_done_callback(done(time.perf_counter()))
                i += 1
            time.sleep(0.001)
        deadline = time.monotonic() + 120
        while len(lat) < total and time.monotonic() < deadline:
            time.sleep(0.01)
        achieved = total / (time.perf_counter() - t0)
        return {"worker": worker, "offered_per_s": rate, "requests": total, "completed": len(lat),
                "achieved_per_s": achieved, **bench_raw.latency_summary(lat)}


def libsql_batch_insert(rows: int = 100_000, batch: int = 500) -> dict[str, Any]:
    import libsql

    with tempfile.TemporaryDirectory() as tmp:
        conn = libsql.connect(str(Path(tmp) / "raw.db"))
        conn.execute("PRAGMA journal_mode=WAL").fetchall()
        conn.execute("PRAGMA synchronous=FULL").fetchall()
        conn.execute("CREATE TABLE m (id TEXT PRIMARY KEY, conversation TEXT, text TEXT, ts REAL)")
        conn.commit()
        text = "m" * (PAYLOAD - 40)
        t = time.perf_counter()
        for start in range(0, rows, batch):
            conn.executemany("INSERT INTO m VALUES (?, ?, ?, ?)",
                             [(f"id{i}", f"c{i % 100}", text, time.time()) for i in range(start, start + batch)])
            conn.commit()
        seconds = time.perf_counter() - t
        conn.close()
        return {"rows": rows, "batch": batch, "rows_per_s": rows / seconds, "durability": "WAL, synchronous=FULL"}


# -- the run ----------------------------------------------------------------------------------------


def repeat(fn: Callable[[], dict[str, Any]], runs: int, key: str) -> dict[str, Any]:
    results = [fn() for _ in range(runs)]
    values = [r[key] for r in results]
    best = results[values.index(statistics.median_high(values))]
    return {**best, key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values),
            "runs": runs}


def run(quick: bool, runs: int, peers: bool) -> dict[str, Any]:
    n = 20_000 if quick else 300_000
    out: dict[str, Any] = {"machine": bench_raw.machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "versions": bench_raw.lib_versions("pyzmq", "lmdb", "msgspec", "libsql")}
    out["raw_zmq_push_pull"] = bench_raw.zmq_push_pull(count=n)
    out["raw_lmdb_batch_put"] = bench_raw.lmdb_batch_put(total=n // 2)
    out["raw_libsql_batch_insert"] = libsql_batch_insert(rows=n // 6)
    out["codec"] = bench_raw.codec_compare(count=50_000 if quick else 200_000)
    out["durable_publish_1"] = repeat(lambda: durable_publish(1, n), runs, "msgs_per_s")
    out["durable_publish_2"] = repeat(lambda: durable_publish(2, n // 2), runs, "msgs_per_s")
    out["publish_latency"] = publish_latency(500 if quick else 3000)
    out["publish_to_group"] = repeat(lambda: publish_to_group(n), runs, "msgs_per_s")
    m = 5_000 if quick else 50_000
    out["store_pipeline_lmdb"] = repeat(lambda: store_pipeline("lmdb", m), runs, "req_per_s")
    out["store_pipeline_libsql"] = repeat(lambda: store_pipeline("libsql", m // 2), runs, "req_per_s")
    for rate in (1000, 10_000):
        out[f"store_latency_lmdb_{rate}"] = store_latency_at_rate("lmdb", rate, 2 if quick else 5)
    if peers:
        import bench_peers

        out["peers"] = bench_peers.run_all(quick=quick) if hasattr(bench_peers, "run_all") else {}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, one run, print JSON only")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peers", action="store_true", help="also run Redis Streams and NATS JetStream")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json")
    args = ap.parse_args()
    result = run(args.quick, 1 if args.quick else args.runs, args.peers)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if not args.quick:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
