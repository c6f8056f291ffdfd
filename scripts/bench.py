"""membus benchmarks, side by side with the raw ceilings (and, with --peers, Redis Streams and NATS JetStream).

    .venv/bin/python scripts/bench.py --peers    # full run: docs/benchmarks.json, docs/benchmarks.md, docs/img/
    .venv/bin/python scripts/bench.py --quick    # small counts, one run: JSON in the temp folder
    .venv/bin/python scripts/bench.py --scale-target 1000000   # a shorter scaling run (default 10M events)

Every figure comes from this run on this machine; medians of --runs runs with min and max.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_raw  # noqa: E402

from bus.client import Bus  # noqa: E402
from bus.home import Home  # noqa: E402

PAYLOAD = 256
PUBLISH_MANY_BATCH = 500
"""Payloads per publish_many call: the Redis peer pipelines as many XADDs per round trip."""


# -- processes --------------------------------------------------------------------------------------


@functools.cache
def temporary_config() -> str:
    """A config folder for this run, deleted at exit, in this process's environment so that every process it
    starts inherits it: a temporary home without an OS keyring keeps its key file there, not in ~/.config."""
    folder = tempfile.mkdtemp(prefix="membus-bench-config-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["XDG_CONFIG_HOME"] = folder
    return folder


PIDS: dict[Path, list[int]] = {}
"""The processes of each running ``system``, by home: the broker's, then its workers'."""


@contextmanager
def system(workers: tuple[str, ...] = ()) -> Iterator[Path]:
    """A broker (and workers) in a temporary home, always stopped."""
    temporary_config()
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
            PIDS[home] = [p.pid for p in procs]
            yield home
        finally:
            PIDS.pop(home, None)
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


def _batch_publisher(home: str, name: str, count: int, batch: int, start: Any, results: Any,
                     topic: str = "bench.load.changed", in_flight: int = 20_000) -> None:
    """``publish_many_nowait`` of ``batch`` payloads per call, up to ``in_flight`` messages in flight (as
    many as the per-message publisher of the same figure)."""
    data = [{"blob": "x" * (PAYLOAD - 16)}] * batch
    with Bus.connect(home, module=name) as bus:
        start.wait()
        t0 = time.perf_counter()
        pending: collections.deque[Any] = collections.deque()
        for _ in range(count // batch):
            pending.append(bus.publish_many_nowait(topic, data, timeout=120))
            if len(pending) * batch >= in_flight:
                pending.popleft().result(120)
        for p in pending:
            p.result(120)
        results.put((t0, time.perf_counter()))


def durable_publish(publishers: int, count: int, batch: int = 0) -> dict[str, Any]:
    """N publisher processes, 256-byte payloads, as fast as the client allows; ack = durable (fsync).

    ``batch``: 0 for one ``publish_nowait`` per message, else ``publish_many`` calls of that many payloads.
    """
    with system() as home:
        return _publish_into(home, publishers, count, batch)


def _publish_into(home: Path, publishers: int, count: int, batch: int = 0) -> dict[str, Any]:
    """``durable_publish`` on the broker of ``home``."""
    ctx = mp.get_context("spawn")
    count -= count % batch if batch else 0
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_batch_publisher, args=(str(home), f"pub{i}", count, batch, start, results))
             if batch else
             ctx.Process(target=_publisher, args=(str(home), f"pub{i}", count, 20_000, start, results))
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
            "msgs_per_s": total / seconds, "durability": "ack after fdatasync (the log journal's group commit)",
            "api": f"publish_many, {batch} per call, up to 20,000 in flight" if batch else
            "publish_nowait per message, up to 20,000 in flight"}


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
        got = 0
        lat_s: list[float] = []
        t_first = None
        while got < count:
            batch = c.fetch(2000, timeout=30)
            if not batch:
                break
            now = time.time_ns()
            t_first = t_first or time.perf_counter()
            lat_s.extend((now - d.message.ts) / 1e9 for d in batch[::10])
            c.ack(batch)
            got += len(batch)
        results.put((got, time.perf_counter(), lat_s))


def publish_to_group(count: int, batch: int = 0) -> dict[str, Any]:
    """Publisher process -> broker -> group consumer process with credit and acks.

    ``batch``: 0 for one ``publish_nowait`` per message, else ``publish_many`` calls of that many payloads.
    """
    ctx = mp.get_context("spawn")
    count -= count % batch if batch else 0
    with system() as home:
        ready, results = ctx.Event(), ctx.Queue()
        consumer = ctx.Process(target=_group_consumer, args=(str(home), count, ready, results))
        consumer.start()
        ready.wait(60)
        time.sleep(0.5)
        start, pub_results = ctx.Event(), ctx.Queue()
        pub = (ctx.Process(target=_batch_publisher, args=(str(home), "bench-pub", count, batch, start, pub_results,
                                                          "bench.e2e.changed", 4000))
               if batch else ctx.Process(target=_publisher_topic, args=(str(home), count, start, pub_results)))
        pub.start()
        time.sleep(1.5)
        start.set()
        t0, _ = pub_results.get(timeout=300)
        got, t_end, lat = results.get(timeout=300)
        pub.join(30)
        consumer.join(30)
        return {"messages": got, "msgs_per_s": got / (t_end - t0), **bench_raw.latency_summary(lat),
                "api": f"publish_many, {batch} per call, up to 4,000 in flight" if batch else
                "publish_nowait per message, up to 4,000 in flight"}


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

        written = {pid: bench_raw.bytes_written(pid) for pid in PIDS[home]}
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
        per_request = bench_raw.per_request([bench_raw.grown(start, bench_raw.bytes_written(pid))
                                             for pid, start in written.items()], len(lat))
        return {"worker": worker, "offered_per_s": rate, "requests": total, "completed": len(lat),
                "achieved_per_s": achieved, "disk_bytes_per_request": per_request, **bench_raw.latency_summary(lat)}


# -- replay, offered load, scaling --------------------------------------------------------------------


def _filler(home: str, name: str, count: int, report_every: int, start: Any, results: Any) -> None:
    """Publishes ``count`` messages as fast as it can, reporting (messages so far, time) every ``report_every``."""
    data = {"blob": "x" * (PAYLOAD - 16)}
    with Bus.connect(home, module=name) as bus:
        start.wait()
        pending: list[Any] = []
        done = 0
        for i in range(1, count + 1):
            pending.append(bus.publish_nowait("bench.fill.changed", data, timeout=300))
            if len(pending) >= 20_000:
                for p in pending[:10_000]:
                    p.result(300)
                del pending[:10_000]
                done += 10_000
            if i % report_every == 0:
                results.put(("progress", name, done, time.time()))
        for p in pending:
            p.result(300)
        results.put(("done", name, count, time.time()))


def _fill(home: Path, events: int, publishers: int = 2, report_every: int = 100_000,
          on_progress: Callable[[list[tuple[str, str, int, float]]], None] | None = None) -> float:
    """Logs ``events`` messages from ``publishers`` processes; returns the seconds it took."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    per = -(-events // publishers)
    procs = [ctx.Process(target=_filler, args=(str(home), f"fill{i}", per, report_every, start, results))
             for i in range(publishers)]
    for p in procs:
        p.start()
    time.sleep(1.5)
    t0 = time.time()
    start.set()
    reports: list[tuple[str, str, int, float]] = []
    finished = 0
    while finished < publishers:
        item = results.get(timeout=900)
        reports.append(item)
        finished += item[0] == "done"
        if on_progress is not None:
            on_progress(reports)
    for p in procs:
        p.join(30)
    return max(r[3] for r in reports) - t0


def replay(events: int) -> dict[str, Any]:
    """Logs ``events`` messages (not timed), then reads them all back in order with ``Bus.replay()``."""
    with system() as home:
        load_seconds = _fill(home, events)
        with Bus.connect(home, module="bench-replay") as bus:
            t = time.perf_counter()
            read = 0
            last = 0
            for msg in bus.replay(from_seq=1, timeout=60):
                read += 1
                last = msg.seq
            seconds = time.perf_counter() - t
        return {"events": events, "read": read, "last_seq": last, "seconds": seconds,
                "events_per_s": read / seconds, "load_seconds": load_seconds,
                "method": "Bus.replay(from_seq=1): REPLAY pages over the log, envelopes decoded (payloads lazily)"}


def publish_at_rate(rates: list[float], seconds: float) -> list[dict[str, Any]]:
    """Open-loop durable publishes at fixed offered rates: latency from publish to the durable ack."""
    out = []
    with system() as home, Bus.connect(home, module="bench-offered") as bus:
        data = {"blob": "x" * (PAYLOAD - 16)}
        for _ in range(200):
            bus.publish("bench.warm.changed", data)
        for rate in rates:
            total = int(rate * seconds)
            lat: list[float] = []

            def done(sent: float, lat: list[float] = lat) -> Callable[[Any], None]:
                return lambda _p: lat.append(time.perf_counter() - sent)

            t0 = time.perf_counter()
            i = 0
            while i < total:  # every millisecond, send what is due
                due = min(total, int((time.perf_counter() - t0) * rate) + 1)
                while i < due:
                    bus.publish_nowait("bench.rate.changed", data, timeout=60).add_done_callback(
                        done(time.perf_counter()))
                    i += 1
                time.sleep(0.001)
            deadline = time.monotonic() + 60
            while len(lat) < total and time.monotonic() < deadline:
                time.sleep(0.005)
            out.append({"offered_per_s": rate, "messages": total, "completed": len(lat),
                        "achieved_per_s": total / (time.perf_counter() - t0), **bench_raw.latency_summary(lat)})
    return out


def _trend_degradation(curve: list[dict[str, Any]]) -> float | None:
    """1 - the least-squares line's throughput at the last window over its throughput at the first: every
    window counts, so one fast or slow minute at either end moves it less than medians of three do."""
    if len(curve) < 3:
        return None
    slope, intercept = statistics.linear_regression([p["log_events"] for p in curve], [p["msgs_per_s"] for p in curve])
    start, end = (intercept + slope * curve[i]["log_events"] for i in (0, -1))
    return 1 - end / start if start > 0 else None


def empty_vs_full(full: Path, rounds: int, messages: int) -> dict[str, Any]:
    """Durable publish (two publishers) into the full log of ``full`` and into a new, empty one, in turn, in
    ABBA order: the two runs of a round are seconds apart, so their ratio shows the log's size rather than the
    machine's drift between the start and the end of a long fill."""
    out = []
    for r in range(rounds):
        got: dict[str, float] = {}
        for which in ("full", "empty") if r % 2 == 0 else ("empty", "full"):
            run = _publish_into(full, 2, messages // 2) if which == "full" else durable_publish(2, messages // 2)
            got[which] = run["msgs_per_s"]
        out.append({"full_msgs_per_s": got["full"], "empty_msgs_per_s": got["empty"],
                    "ratio": got["full"] / got["empty"]})
    ratio = statistics.median(r["ratio"] for r in out)
    return {"rounds": out, "messages_per_run": messages, "degradation": 1 - ratio,
            "full_msgs_per_s": statistics.median(r["full_msgs_per_s"] for r in out),
            "empty_msgs_per_s": statistics.median(r["empty_msgs_per_s"] for r in out),
            "workload": "durable publish, 2 publishers, publish_nowait; the full log grows by each full run"}


def scaling(target: int, windows: int = 20, pairs: int = 9, pair_messages: int = 200_000) -> dict[str, Any]:
    """Fills the log from empty to ``target`` events with two publishers; per window of log size: the fill
    throughput and the latency of awaited probe publishes made meanwhile (one every 2 ms). Then
    ``empty_vs_full``: the same durable publish into this full log and into an empty one, in turn."""
    import threading

    with system() as home:
        probes: list[tuple[float, float]] = []
        stop = threading.Event()

        def probe() -> None:
            with Bus.connect(home, module="bench-probe") as bus:
                data = {"blob": "x" * (PAYLOAD - 16)}
                while not stop.is_set():
                    t = time.perf_counter()
                    bus.publish("bench.probe.changed", data, timeout=60)
                    probes.append((time.time(), time.perf_counter() - t))
                    time.sleep(0.002)

        th = threading.Thread(target=probe, daemon=True)
        th.start()
        reports: list[tuple[str, str, int, float]] = []
        seconds = _fill(home, target, report_every=max(1000, target // (windows * 4)),
                        on_progress=lambda r: reports.__setitem__(slice(None), r))
        stop.set()
        th.join(10)
        paired = empty_vs_full(home, pairs, pair_messages)
        size = Home(home).log_dir
        disk = sum(f.stat().st_size for f in size.iterdir() if f.is_file())
    # the log size at each report: the sum of every publisher's latest count
    latest: dict[str, int] = {}
    points: list[tuple[int, float]] = []
    for _kind, name, count, when in sorted(reports, key=lambda r: r[3]):
        latest[name] = count
        points.append((sum(latest.values()), when))
    step = target / windows
    curve = []
    for w in range(windows):
        lo, hi = w * step, (w + 1) * step
        inside = [(c, t) for c, t in points if lo <= c <= hi]
        before = [(c, t) for c, t in points if c < lo]
        if before:
            inside = [before[-1], *inside]
        if len(inside) < 2:
            continue
        (c0, t0), (c1, t1) = inside[0], inside[-1]
        lat = [lt for when, lt in probes if t0 <= when <= t1]
        curve.append({"log_events": int(hi), "msgs_per_s": (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0,
                      **bench_raw.latency_summary(lat)})
    steady = curve[1:-1] if len(curve) > 4 else curve  # the first and last windows hold the start and the finish
    first = statistics.median(p["msgs_per_s"] for p in steady[:3]) if steady else 0.0
    last = statistics.median(p["msgs_per_s"] for p in steady[-3:]) if steady else 0.0
    return {"target_events": target, "seconds": seconds, "log_bytes": disk, "windows": curve,
            "first_windows_msgs_per_s": first, "last_windows_msgs_per_s": last,
            "degradation": 1 - last / first if first else None, "trend_degradation": _trend_degradation(steady),
            "empty_vs_full": paired,
            "probe": "awaited publish every 2 ms from another client while two publishers fill the log"}


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
    """Runs ``fn`` ``runs`` times: the run whose ``key`` is the median, with the median, min and max of ``key``."""
    return _summary([fn() for _ in range(runs)], key)


def alternate(fns: dict[str, Callable[[], dict[str, Any]]], runs: int, key: str) -> dict[str, dict[str, Any]]:
    """``repeat`` for several figures that are compared with each other: run in turn, ``runs`` rounds, so a
    slow minute of the machine hits each of them alike."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            results[name].append(fn())
    return {name: _summary(rs, key) for name, rs in results.items()}


def _summary(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    runs = len(results)
    values = [r[key] for r in results]
    best = results[values.index(statistics.median_high(values))]
    return {**best, key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values),
            "runs": runs}


def _step(name: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)


def membus_figures(quick: bool, runs: int) -> dict[str, Any]:
    n = 20_000 if quick else 200_000
    out: dict[str, Any] = {}
    for pubs in (1, 2, 8):
        _step(f"membus durable publish, {pubs} publisher(s), publish_nowait and publish_many in turn")
        out.update(alternate({f"durable_publish_{pubs}": partial(durable_publish, pubs, n // pubs),
                              f"durable_publish_many_{pubs}": partial(durable_publish, pubs, n // pubs,
                                                                      PUBLISH_MANY_BATCH)}, runs, "msgs_per_s"))
    _step("membus durable publish, 2 publishers, encryption at rest off")
    os.environ["MEMBUS_ENCRYPTION"] = "0"
    try:
        out["durable_publish_2_plaintext"] = repeat(lambda: durable_publish(2, n // 2), runs, "msgs_per_s")
    finally:
        del os.environ["MEMBUS_ENCRYPTION"]
    _step("membus awaited publish latency")
    out["publish_latency"] = publish_latency(500 if quick else 3000)
    _step("membus publish -> group consumer, publish_nowait and publish_many publishers in turn")
    out.update(alternate({"publish_to_group": partial(publish_to_group, n),
                          "publish_many_to_group": partial(publish_to_group, n, PUBLISH_MANY_BATCH)},
                         runs, "msgs_per_s"))
    m = 4_000 if quick else 30_000
    _step("membus store pipelines")
    out["store_pipeline_lmdb"] = repeat(lambda: store_pipeline("lmdb", m), runs, "req_per_s")
    out["store_pipeline_libsql"] = repeat(lambda: store_pipeline("libsql", m // 2), runs, "req_per_s")
    for rate in (1000, 10_000):
        _step(f"membus lmdb store pipeline at {rate} req/s offered")
        out[f"store_latency_lmdb_{rate}"] = store_latency_at_rate("lmdb", rate, 2 if quick else 5)
    _step("membus replay")
    out["replay"] = replay(50_000 if quick else 1_000_000)
    _step("membus publish latency as the offered load rises")
    out["publish_at_rate"] = publish_at_rate([1000, 5000, 20_000, 50_000, 100_000], 1.0 if quick else 3.0)
    return out


def raw_figures(quick: bool) -> dict[str, Any]:
    n = 20_000 if quick else 200_000
    _step("raw ceilings")
    return {"zmq_push_pull": bench_raw.zmq_push_pull(count=n),
            "minimal_durable_broker": bench_raw.minimal_durable_broker(count=2 * n),
            "lmdb_batch_put": bench_raw.lmdb_batch_put(total=n // 2),
            "libsql_batch_insert": libsql_batch_insert(rows=n // 6),
            "codec": bench_raw.codec_compare(count=50_000 if quick else 200_000)}


def peer_figures(quick: bool) -> dict[str, Any]:
    """Redis Streams and NATS JetStream on the same workloads, if their servers are installed (nothing is
    installed here: see docs/bench-peers-setup.md). Each server runs in a temporary folder and is stopped."""
    import bench_peers

    per_publisher = 5_000 if quick else 100_000
    requests = 5_000 if quick else 50_000
    duration = 1.0 if quick else 5.0
    events = 50_000 if quick else 1_000_000
    out: dict[str, Any] = {"versions": {}, "publish": [], "pipeline": [], "replay": [], "unavailable": []}
    try:
        out["versions"] = bench_peers.versions()
    except bench_peers.PeerUnavailable as exc:
        out["unavailable"].append(str(exc))
    jobs: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
    for fsync in ("always", "everysec"):
        for n in (1, 8):
            jobs.append(("redis", "publish", partial(bench_peers.redis_publish, n, per_publisher // n, fsync=fsync)))
        jobs.append(("redis", "pipeline", partial(bench_peers.redis_pipeline, requests, fsync=fsync)))
        for rate in (1000.0, 10_000.0):
            jobs.append(("redis", "pipeline", partial(bench_peers.redis_pipeline, rate_per_s=rate, duration=duration,
                                                      fsync=fsync)))
    for sync in ("default", "always"):
        for n in (1, 8):
            jobs.append(("nats", "publish", partial(bench_peers.jetstream_publish, n, per_publisher // n, sync=sync)))
        jobs.append(("nats", "pipeline", partial(bench_peers.jetstream_pipeline, requests, sync=sync)))
        for rate in (1000.0, 10_000.0):
            jobs.append(("nats", "pipeline", partial(bench_peers.jetstream_pipeline, rate_per_s=rate,
                                                     duration=duration, sync=sync)))
    jobs.append(("redis", "replay", partial(bench_peers.redis_replay, events)))
    jobs.append(("nats", "replay", partial(bench_peers.jetstream_replay, events, mode="ordered")))
    missing: set[str] = set()
    for system_name, kind, job in jobs:
        if system_name in missing:
            continue
        _step(f"peer {system_name} {kind}")
        try:
            result = job()
        except bench_peers.PeerUnavailable as exc:
            missing.add(system_name)
            out["unavailable"].append(str(exc))
            continue
        result.pop("versions", None)
        out[kind].append(result)
    return out


def run(quick: bool, runs: int, peers: bool, scale_target: int) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": {**bench_raw.machine(), **_machine_extra()},
                           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick, "runs": runs,
                           "versions": bench_raw.lib_versions("pyzmq", "lmdb", "msgspec", "libsql", "cryptography")}
    out["raw"] = raw_figures(quick)
    out["membus"] = membus_figures(quick, runs)
    if scale_target:
        _step(f"membus scaling run to {scale_target:,} events")
        out["membus"]["scaling"] = scaling(scale_target, pair_messages=20_000 if quick else 200_000)
    if peers:
        out["peers"] = peer_figures(quick)
    return out


def _machine_extra() -> dict[str, Any]:
    extra: dict[str, Any] = {"load_average_at_start": os.getloadavg()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                extra["cpu"] = line.split(":", 1)[1].strip()
                break
        extra["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    return extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, one run")
    ap.add_argument("--runs", type=int, default=3, help="runs per throughput figure (median, min, max)")
    ap.add_argument("--peers", action="store_true", help="also run Redis Streams and NATS JetStream")
    ap.add_argument("--scale-target", type=int, default=None,
                    help="log size the scaling run fills to (default 10M; 200k with --quick; 0 skips it)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json")
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                    help="write docs/benchmarks.md and docs/img/*.png (default: on for a full run)")
    args = ap.parse_args()
    target = args.scale_target if args.scale_target is not None else (200_000 if args.quick else 10_000_000)
    result = run(args.quick, 1 if args.quick else args.runs, args.peers, target)
    text = json.dumps(result, indent=2, default=str)
    out = args.out if not args.quick or args.out != ROOT / "docs" / "benchmarks.json" else \
        Path(tempfile.gettempdir()) / "membus-benchmarks-quick.json"
    out.write_text(text + "\n")
    print(f"results: {out}", file=sys.stderr)
    if args.docs if args.docs is not None else not args.quick:
        import bench_charts

        bench_charts.write_docs(result, ROOT / "docs")
        print("wrote docs/benchmarks.md and docs/img/", file=sys.stderr)


if __name__ == "__main__":
    main()
