"""Raw ceilings: what the parts under membus can do alone on this machine.

- pyzmq PUSH/PULL over tcp loopback (sender and receiver in separate processes),
- a minimal durable broker: a ROUTER logging coalesced frames of envelopes to LMDB with group commit,
- LMDB batch puts, one synced transaction per batch,
- msgspec against msgpack + hand-written validation, for the envelope codec.

Also holds the small process and timing helpers that scripts/bench_peers.py shares.
Every function returns a JSON-serialisable dict: the figures and the settings used.
Try alone: ``.venv/bin/python scripts/bench_raw.py --quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import msgspec

from contracts.errors import BusError
from contracts.errors import TimeoutError as BusTimeoutError

PAYLOAD_BYTES = 256
LOOPBACK = "127.0.0.1"
_U64 = struct.Struct(">Q")
JOIN_TIMEOUT_S = 5.0

# ---------------------------------------------------------------- shared helpers


def payload(size: int = PAYLOAD_BYTES) -> bytes:
    return os.urandom(size)


def lib_versions(*dists: str) -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    for dist in dists:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine()}


def bytes_written(pid: int | str = "self") -> int | None:
    """What a process has had written to the storage layer (``write_bytes`` of /proc/PID/io, counted when a page
    is dirtied: fdatasync'd rewrites of a page count each time); None where there is no /proc or it is gone."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def grown(before: int | None, after: int | None) -> int | None:
    """``after - before`` of two bytes_written readings; None if either is unknown."""
    return after - before if before is not None and after is not None else None


def per_request(written: Sequence[int | None], requests: int) -> int | None:
    """The bytes each process wrote, summed, per request; None when one of them is unknown."""
    if not requests or not written or any(w is None for w in written):
        return None
    return round(sum(w for w in written if w is not None) / requests)


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds (nearest-rank percentiles)."""
    if not latencies_s:
        return {}
    ordered = sorted(latencies_s)
    last = len(ordered) - 1

    def pct(p: float) -> float:
        return round(ordered[min(last, round(p / 100 * last))] * 1000, 3)

    return {
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 3),
    }


def spawn_context() -> mp.context.SpawnContext:
    """Spawn, never fork: each child starts clean and opens its own sockets and stores."""
    return mp.get_context("spawn")


@contextlib.contextmanager
def spawned(targets: Sequence[tuple[Callable[..., None], tuple[Any, ...]]]) -> Iterator[list[SpawnProcess]]:
    """Start one process per (function, args); on exit stop any still running (terminate, then kill)."""
    ctx = spawn_context()
    procs = [ctx.Process(target=fn, args=args, daemon=True) for fn, args in targets]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            if proc.pid is not None:
                proc.join(timeout=0.1 if proc.is_alive() else 0)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(JOIN_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(JOIN_TIMEOUT_S)


def collect(results: Any, procs: Sequence[SpawnProcess], count: int, deadline: float) -> list[Any]:
    """Take ``count`` results off a multiprocessing queue; fail fast if a child dies or time runs out."""
    got: list[Any] = []
    while len(got) < count:
        if time.monotonic() > deadline:
            raise BusTimeoutError("benchmark children did not report in time", expected=count, got=len(got))
        try:
            got.append(results.get(timeout=0.2))
            continue
        except queue.Empty:
            pass
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise BusError("a benchmark child process failed (traceback on stderr)", exitcodes=dead)
    return got


def wait_for_children(procs: Sequence[SpawnProcess], deadline: float) -> None:
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode != 0:
            raise BusError("a benchmark child process failed or hung", exitcode=proc.exitcode)


# ---------------------------------------------------------------- pyzmq PUSH/PULL


def _zmq_receiver(count: int, results: Any, time_limit: float) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(time_limit * 1000))
    try:
        port = sock.bind_to_random_port(f"tcp://{LOOPBACK}")
        results.put(("port", port))
        received = 0
        nbytes = 0
        while received < count:
            nbytes += len(sock.recv(copy=True))
            received += 1
        results.put(("done", time.monotonic(), received, nbytes))
    finally:
        sock.close(linger=0)
        ctx.term()


def _zmq_sender(port: int, count: int, size: int, start: Any, results: Any) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    try:
        sock.connect(f"tcp://{LOOPBACK}:{port}")
        body = payload(size)
        start.wait(JOIN_TIMEOUT_S * 6)
        results.put(("start", time.monotonic()))
        for _ in range(count):
            sock.send(body, copy=False)
    finally:
        sock.close()
        ctx.term()


def zmq_push_pull(
    count: int = 200_000, *, size: int = PAYLOAD_BYTES, time_limit: float = 120.0
) -> dict[str, Any]:
    """One PUSH sender process -> one PULL receiver process over tcp loopback, default high-water marks."""
    ctx = spawn_context()
    results = ctx.Queue()
    start = ctx.Event()
    deadline = time.monotonic() + time_limit
    with spawned([(_zmq_receiver, (count, results, time_limit))]) as receiver:
        (kind, port) = collect(results, receiver, 1, deadline)[0]
        assert kind == "port"
        with spawned([(_zmq_sender, (port, count, size, start, results))]) as sender:
            start.set()
            reports = {r[0]: r for r in collect(results, [*receiver, *sender], 2, deadline)}
            wait_for_children([*sender, *receiver], deadline)
    seconds = reports["done"][1] - reports["start"][1]
    return {
        "system": "pyzmq",
        "workload": "push_pull",
        "transport": "tcp loopback",
        "durability": "none (memory only)",
        "payload_bytes": size,
        "count": count,
        "received": reports["done"][2],
        "seconds": round(seconds, 4),
        "msgs_per_s": rate(count, seconds),
        "versions": {**lib_versions("pyzmq"), "libzmq": _libzmq_version()},
    }


def _libzmq_version() -> str:
    import zmq

    return str(zmq.zmq_version())


# ---------------------------------------------------------------- a minimal durable broker


_MIN_FRAME = 1000
"""Envelopes per PUB frame in the minimal broker's clients (membus's client coalesces up to 1024)."""
_MIN_WINDOW = 4
"""Frames a minimal client keeps in flight (membus's client: 4)."""


def _minimal_broker(total: int, results: Any, time_limit: float) -> None:
    """A ROUTER that logs every envelope of every PUB frame under its own seq in LMDB (one synced transaction
    per loop turn: group commit) and then acks each frame with its first seq: no envelope decoding, no id
    index, no sealing, no consumers. What membus's broker does per message, minus everything it adds."""
    import lmdb
    import zmq

    workdir = tempfile.mkdtemp(prefix="membus-bench-minimal-")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    env = lmdb.open(workdir, map_size=max(1 << 28, total * 600), sync=True, metasync=True)
    split = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
    pack = _U64.pack
    try:
        results.put(("port", sock.bind_to_random_port(f"tcp://{LOOPBACK}")))
        deadline = time.monotonic() + time_limit
        seq = 0
        cpu0 = time.process_time()
        while seq < total:
            if time.monotonic() > deadline or not sock.poll(int(time_limit * 1000)):
                raise BusTimeoutError("minimal broker: no frames in time", logged=seq)
            turn: list[tuple[bytes, bytes]] = []
            rows: list[tuple[bytes, Any]] = []
            for _ in range(1000):
                try:
                    rid, frame = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                envelopes = split(frame)
                rows += zip(map(pack, range(seq + 1, seq + 1 + len(envelopes))), envelopes, strict=True)
                turn.append((rid, pack(seq + 1)))
                seq += len(envelopes)
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(rows, append=True)
            for rid, first in turn:
                sock.send_multipart([rid, first])
        results.put(("broker", seq, time.process_time() - cpu0))
    finally:
        sock.close(linger=0)
        ctx.term()
        env.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _minimal_client(port: int, count: int, start: Any, results: Any) -> None:
    """Makes every envelope as membus's client does (``encode_new``: a ULID, the time, MessagePack) and sends
    them coalesced, ``_MIN_FRAME`` per frame, ``_MIN_WINDOW`` frames in flight; no per-message future."""
    import zmq

    from contracts.envelope import encode_new

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    data = msgspec.msgpack.encode({"blob": "x" * (PAYLOAD_BYTES - 16)})
    header = b"\xdc" + _MIN_FRAME.to_bytes(2, "big")
    try:
        sock.connect(f"tcp://{LOOPBACK}:{port}")
        start.wait(JOIN_TIMEOUT_S * 6)
        t0, cpu0 = time.monotonic(), time.process_time()
        in_flight = sent = 0
        while sent < count:
            if in_flight >= _MIN_WINDOW:
                sock.recv()
                in_flight -= 1
            frame = header + b"".join([encode_new("bench.load.changed", data)[1] for _ in range(_MIN_FRAME)])
            sock.send(frame)
            in_flight += 1
            sent += _MIN_FRAME
        for _ in range(in_flight):
            sock.recv()
        results.put(("client", t0, time.monotonic(), time.process_time() - cpu0))
    finally:
        sock.close(linger=0)
        ctx.term()


def minimal_durable_broker(count: int = 400_000, *, publishers: int = 2, time_limit: float = 120.0) -> dict[str, Any]:
    """The ceiling the bus-core issue quotes: a minimal ROUTER broker with LMDB group commit, fed by clients
    that coalesce envelopes into frames, each process separate, same payloads as the durable-publish figure."""
    per = -(-count // publishers // _MIN_FRAME) * _MIN_FRAME
    ctx = spawn_context()
    results = ctx.Queue()
    start = ctx.Event()
    deadline = time.monotonic() + time_limit
    with spawned([(_minimal_broker, (per * publishers, results, time_limit))]) as broker:
        (kind, port) = collect(results, broker, 1, deadline)[0]
        assert kind == "port"
        with spawned([(_minimal_client, (port, per, start, results)) for _ in range(publishers)]) as clients:
            start.set()
            reports = collect(results, [*broker, *clients], publishers + 1, deadline)
            wait_for_children([*clients, *broker], deadline)
    spans = [r for r in reports if r[0] == "client"]
    (_, logged, broker_cpu) = next(r for r in reports if r[0] == "broker")
    seconds = max(r[2] for r in spans) - min(r[1] for r in spans)
    return {
        "system": "minimal ROUTER broker",
        "workload": "durable_publish",
        "durability": "LMDB sync=True, metasync=True: one synced transaction per loop turn (group commit)",
        "publishers": publishers,
        "envelopes_per_frame": _MIN_FRAME,
        "frames_in_flight": _MIN_WINDOW,
        "payload_bytes": PAYLOAD_BYTES,
        "count": per * publishers,
        "logged": logged,
        "seconds": round(seconds, 4),
        "msgs_per_s": rate(per * publishers, seconds),
        "broker_cpu_us_per_msg": round(broker_cpu / logged * 1e6, 2),
        "client_cpu_us_per_msg": round(sum(r[3] for r in spans) / logged * 1e6, 2),
        "versions": lib_versions("pyzmq", "lmdb", "msgspec"),
    }


# ---------------------------------------------------------------- LMDB synced batches


def lmdb_batch_put(
    total: int = 200_000, *, batch: int = 500, size: int = PAYLOAD_BYTES, time_limit: float = 120.0
) -> dict[str, Any]:
    """``total`` puts of ``size``-byte values, ``batch`` puts per transaction, each commit synced."""
    import lmdb

    workdir = tempfile.mkdtemp(prefix="membus-bench-lmdb-")
    try:
        env = lmdb.open(workdir, map_size=max(1 << 26, total * (size + 128) * 2), sync=True, metasync=True)
        try:
            body = payload(size)
            deadline = time.monotonic() + time_limit
            started = time.perf_counter()
            written = 0
            while written < total:
                if time.monotonic() > deadline:
                    raise BusTimeoutError("lmdb batch put ran out of time", written=written)
                end = min(total, written + batch)
                with env.begin(write=True) as txn:
                    for i in range(written, end):
                        txn.put(i.to_bytes(8, "big"), body)
                written = end
            seconds = time.perf_counter() - started
            stored = env.stat()["entries"]
        finally:
            env.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "system": "lmdb",
        "workload": "batch_put",
        "durability": "sync=True, metasync=True (fsync per commit)",
        "puts_per_txn": batch,
        "payload_bytes": size,
        "count": total,
        "stored": stored,
        "seconds": round(seconds, 4),
        "puts_per_s": rate(total, seconds),
        "txns_per_s": rate(-(-total // batch), seconds),
        "versions": lib_versions("lmdb"),
    }


# ---------------------------------------------------------------- envelope codec


class BenchEnvelope(msgspec.Struct, array_like=True):
    """Mirrors contracts/envelope.py's fields, with the payload as plain bytes."""

    id: str
    topic: str
    payload: bytes
    seq: int
    ts: int
    source: str
    correlation_id: str
    causation_id: str
    reply_to: str
    recipient: str
    version: int
    headers: dict[str, str]


_ENVELOPE_TYPES: tuple[tuple[str, type], ...] = (
    ("id", str),
    ("topic", str),
    ("payload", bytes),
    ("seq", int),
    ("ts", int),
    ("source", str),
    ("correlation_id", str),
    ("causation_id", str),
    ("reply_to", str),
    ("recipient", str),
    ("version", int),
    ("headers", dict),
)


def _validate_msgpack_envelope(obj: Any) -> BenchEnvelope:
    """What msgspec does while decoding, written by hand: shape, types, then build the object."""
    if not isinstance(obj, list) or len(obj) != len(_ENVELOPE_TYPES):
        raise ValueError("envelope: expected an array of 12 fields")
    for value, (name, typ) in zip(obj, _ENVELOPE_TYPES, strict=True):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"envelope.{name}: wrong type")
    headers = obj[11]
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError("envelope.headers: expected str -> str")
    return BenchEnvelope(*obj)


def _sample_envelope(size: int) -> BenchEnvelope:
    return BenchEnvelope(
        id="01J8Z3V5W6X7Y8Z9A0B1C2D3E4",
        topic="memory.store.request",
        payload=payload(size),
        seq=123_456,
        ts=time.time_ns(),
        source="companion.core",
        correlation_id="01J8Z3V5W6X7Y8Z9A0B1C2D3E4",
        causation_id="",
        reply_to="inbox.companion.core.7",
        recipient="",
        version=1,
        headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )


def _ops_per_s(fn: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        fn()
    return rate(count, time.perf_counter() - started)


def codec_compare(count: int = 200_000, *, size: int = PAYLOAD_BYTES) -> dict[str, Any]:
    """Encode and decode+validate one typical envelope ``count`` times with each library."""
    import msgpack

    env = _sample_envelope(size)
    as_list = [getattr(env, f) for f in env.__struct_fields__]
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(BenchEnvelope)
    wire = encoder.encode(env)
    packer = msgpack.Packer(use_bin_type=True)
    wire_mp = packer.pack(as_list)
    if wire != wire_mp or decoder.decode(wire) != _validate_msgpack_envelope(msgpack.unpackb(wire_mp)):
        raise BusError("msgspec and msgpack disagree on the envelope bytes")
    return {
        "system": "codec",
        "workload": "envelope encode / decode+validate",
        "envelope": "12-field array (contracts/envelope.py shape)",
        "payload_bytes": size,
        "wire_bytes": len(wire),
        "count": count,
        "msgspec_encode_ops_per_s": _ops_per_s(lambda: encoder.encode(env), count),
        "msgspec_decode_ops_per_s": _ops_per_s(lambda: decoder.decode(wire), count),
        "msgpack_encode_ops_per_s": _ops_per_s(
            lambda: packer.pack([getattr(env, f) for f in env.__struct_fields__]), count
        ),
        "msgpack_decode_ops_per_s": _ops_per_s(
            lambda: _validate_msgpack_envelope(msgpack.unpackb(wire_mp)), count
        ),
        "notes": "msgpack encode includes turning the object into a list; decode includes validation "
        "and building the same object msgspec returns",
        "versions": lib_versions("msgspec", "msgpack"),
    }


# ---------------------------------------------------------------- run everything


def run_all(*, quick: bool = False) -> dict[str, Any]:
    scale = 10 if quick else 1
    return {
        "machine": machine(),
        "zmq_push_pull": zmq_push_pull(1_000_000 // scale),
        "minimal_durable_broker": minimal_durable_broker(400_000 // scale),
        "lmdb_batch_500": lmdb_batch_put(500_000 // scale, batch=500),
        "lmdb_batch_1000": lmdb_batch_put(500_000 // scale, batch=1000),
        "codec": codec_compare(500_000 // scale),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts (a few seconds)")
    args = parser.parse_args(argv)
    json.dump(run_all(quick=args.quick), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
