"""Failure paths: kill -9 mid-stream, slow consumers, lost live frames, malformed and oversized input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from bus import protocol as P
from bus.client import Bus
from contracts.envelope import encode_envelope, make_envelope
from contracts.errors import BusError, ConnectionError, NotAuthorized, StoreFull, ValidationError
from tests.conftest import BrokerProcess, wait_until
from tests.workers_util import publish_all


def test_a_subscription_catching_up_when_the_broker_restarts_resumes_where_it_was(broker: BrokerProcess) -> None:
    """The page it asked for is never answered by the broker that died: it is asked again of the new one."""
    assert broker.proc is not None
    n = 3000
    with Bus.connect(broker.home.path, module="catch-up", timeout=30) as bus:
        bus.publish_many("test.catchup.changed", [{"i": i} for i in range(n)])
        got: list[int] = []
        with bus.subscribe("test.catchup.>", from_seq=1, max_queued=100) as sub:
            got += [sub.get(timeout=20).payload["i"] for _ in range(10)]
            os.kill(broker.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(TimeoutError):  # the queue drains, and the next page is asked of a frozen broker
                    while True:
                        got.append(sub.get(timeout=1).payload["i"])
            finally:
                broker.kill()
            broker.start()
            while len(got) < n:
                got.append(sub.get(timeout=30).payload["i"])
    assert got == list(range(n))


def test_kill_9_broker_while_clients_publish_loses_no_acknowledged_message(broker: BrokerProcess) -> None:
    acked: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    stop = threading.Event()
    errors: list[Exception] = []

    def publisher(name: str) -> None:
        with Bus.connect(broker.home.path, module=f"pub-{name}", timeout=30) as b:
            i = 0
            while not stop.is_set():
                mid = None
                try:
                    if name == "a":
                        window = [(i + k, b.publish_nowait("test.crash.changed", {"p": name, "i": i + k},
                                                           timeout=60)) for k in range(50)]
                        for n, p in window:
                            acked[name].append((n, p.result(70)))
                    else:  # the batch call: its frames are resent after the restart just the same
                        bulk = b.publish_many_nowait("test.crash.changed", [{"p": name, "i": i + k} for k in range(50)],
                                                     timeout=60)
                        acked[name].extend(zip(range(i, i + 50), bulk.result(70), strict=True))
                    i += 50
                except BusError as exc:  # only allowed outcome: a timeout, then we stop
                    errors.append(exc)
                    return
                del mid

    threads = [threading.Thread(target=publisher, args=(n,), daemon=True) for n in acked]
    for t in threads:
        t.start()
    wait_until(lambda: all(len(v) > 200 for v in acked.values()), what="publishing under way")
    broker.kill()
    time.sleep(0.5)
    broker.start()
    wait_until(lambda: all(len(v) > 600 for v in acked.values()), timeout=60, what="publishing resumed")
    stop.set()
    for t in threads:
        t.join(80)
    assert not errors
    with Bus.connect(broker.home.path, module="check") as b:
        logged = [(m.payload["p"], m.payload["i"], m.seq) for m in b.replay(topic="test.crash.changed")]
    by_key = {(p, i): seq for p, i, seq in logged}
    assert len(by_key) == len(logged), "a message is in the log twice"
    for name, items in acked.items():
        for i, seq in items:
            assert by_key[(name, i)] == seq, "an acknowledged message is missing or moved"
        ordered = [i for p, i, _ in logged if p == name]
        assert ordered == sorted(ordered), "a publisher's messages are out of order"
    seqs = [s for _, _, s in logged]
    assert seqs == sorted(seqs)


CONSUMER = textwrap.dedent("""
    import sys, time
    from bus.client import Bus
    home, out = sys.argv[1], sys.argv[2]
    with Bus.connect(home, module="test") as b, b.consume("crashy", ["test.job.*"], credit=50) as c:
        with open(out, "a") as f:
            while True:
                for d in c.fetch(50, timeout=1):
                    f.write(f"{d.seq}\\n"); f.flush()
                    if d.message.payload["i"] % 2 == 0:
                        c.ack([d])
                time.sleep(0.01)
""")


def test_kill_9_group_consumer_mid_batch_redelivers_its_unacked_messages(broker: BrokerProcess,
                                                                          tmp_path: Path) -> None:
    seen = tmp_path / "seen.txt"
    with Bus.connect(broker.home.path, module="test") as bus:
        seqs = [p.result(10) for p in [bus.publish_nowait("test.job.request", {"i": i}) for i in range(40)]]
        victim = subprocess.Popen([sys.executable, "-c", CONSUMER, str(broker.home.path), str(seen)])
        try:
            wait_until(lambda: seen.exists() and len(seen.read_text().split()) >= 40, what="victim got all")
            wait_until(lambda: bus.status()["groups"]["crashy"]["inflight"] == 20, what="odd ones unacked")
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
        with bus.consume("crashy", credit=100) as c:
            redelivered = []
            deadline = time.monotonic() + 30
            while len(redelivered) < 20 and time.monotonic() < deadline:
                batch = c.fetch(100, timeout=1)
                redelivered += batch
                c.ack(batch)
        assert sorted(d.seq for d in redelivered) == [s for s in seqs if (s - seqs[0]) % 2 == 1]
        assert all(d.attempt == 2 for d in redelivered)


def test_a_message_that_keeps_failing_goes_to_dead_letters(bus: Bus) -> None:
    seq = bus.publish("test.poison.request", {"x": 1})
    with bus.consume("picky", ["test.poison.*"], credit=5, max_attempts=3) as c:
        for attempt in (1, 2, 3):
            (d,) = c.fetch(5, timeout=10)
            assert (d.seq, d.attempt) == (seq, attempt)
            c.nack([d], "cannot handle this")
        assert c.fetch(5, timeout=0.5) == []
    dead = [m for m in bus.replay(topic="bus.deadletter")]
    assert len(dead) == 1
    assert dead[0].payload["seq"] == seq and dead[0].payload["reason"] == "cannot handle this"
    assert bus.status()["groups"]["picky"]["dead_letters"] == 1


def test_ids_too_long_for_the_logs_index_are_refused_and_the_log_keeps_reaching_lmdb(broker: BrokerProcess) -> None:
    """The log indexes message and correlation ids as LMDB keys (511 bytes at most): one publish with a
    600-character correlation id made every later copy of the journal into LMDB fail, retried for ever."""
    s = _raw_socket(broker)
    try:
        s.send_multipart([P.HELLO, P.pack({"client": "raw", "inbox": ""})])
        assert s.recv_multipart()[0] == P.WELCOME
        body = msgspec.msgpack.encode(1)
        for env in (make_envelope("test.long.changed", body, correlation_id="c" * 600),
                    make_envelope("test.long.changed", body, message_id="m" * 600),
                    make_envelope("test.long.changed", body, headers={f"h{i}": "v" for i in range(100)})):
            s.send_multipart([P.PUB, P.pack_id(1), msgspec.msgpack.encode([env])])
            err = _error(s)
            assert err["code"] == "protocol" and "PUB body" in err["message"], err
        with Bus.connect(broker.home.path, module="test") as bus:
            for field, kw in (("correlation_id", {"correlation_id": "c" * 101}),
                              ("message_id", {"message_id": "m" * 101}),
                              ("headers", {"headers": {"tracestate": "x" * 5000}})):
                with pytest.raises(ValidationError) as info:  # the client library refuses them before sending
                    bus.publish("test.long.changed", {}, **kw)
                assert info.value.field == field
            with pytest.raises(ValidationError, match="message_ids"):
                bus.publish_many("test.long.changed", [{}, {}], message_ids=["ok", ""])
            publish_all(bus, "test.after.changed", [{"i": i} for i in range(10)])
            wait_until(lambda: (st := bus.status())["log"]["in_lmdb"] == st["head"], timeout=30,
                       what="the log copied into LMDB")
            assert bus.status()["counters"].get("log_apply_errors", 0) == 0
            assert bus.publish("test.after.changed", {}, correlation_id="c" * 100) > 0
    finally:
        s.close(0)


def test_a_nack_with_a_delay_of_nan_or_below_zero_is_redelivered_at_once_and_in_order(bus: Bus) -> None:
    """A NaN delay made the redelivery heap compare false both ways: that message was never due again and
    held the group's floor for good."""
    seqs = [bus.publish("test.nan.request", {"i": i}) for i in range(3)]
    with bus.consume("nan", ["test.nan.*"], credit=1, max_attempts=5) as c:
        for delay in (float("nan"), -1e300):
            (d,) = c.fetch(1, timeout=10)
            assert d.seq == seqs[0]
            c.nack([d], "x" * 100_000, delay=delay)
        got = []
        while len(got) < 3:
            batch = c.fetch(1, timeout=10)
            assert batch, f"not redelivered; got {got}"
            got += [d.seq for d in batch]
            c.ack(batch)
        assert got == seqs
    wait_until(lambda: bus.status()["groups"]["nan"]["lag"] == 0, timeout=10, what="the group's floor at the head")


def test_ack_timeout_redelivers(bus: Bus) -> None:
    seq = bus.publish("test.slowack.request", {})
    with bus.consume("forgetful", ["test.slowack.*"], credit=5, ack_timeout=0.3) as c:
        (first,) = c.fetch(5, timeout=10)
        (again,) = c.fetch(5, timeout=10)
        assert first.seq == again.seq == seq and again.attempt == 2
        c.ack([again])


def test_a_member_that_touches_keeps_its_messages_past_the_ack_timeout(bus: Bus) -> None:
    seq = bus.publish("test.touchy.request", {})
    with bus.consume("busy", ["test.touchy.*"], credit=5, ack_timeout=2.5, max_attempts=2) as c:
        (first,) = c.fetch(5, timeout=10)
        for _ in range(12):  # 6 s: over two ack timeouts, after which an untouched message is dead-lettered
            time.sleep(0.5)
            c.touch()
        group = bus.status()["groups"]["busy"]
        assert (group["inflight"], group["redelivery_pending"], group["dead_letters"]) == (1, 0, 0)
        assert c.fetch(5, timeout=0.5) == []  # not handed out again
        c.ack([first])
        assert first.seq == seq
    assert bus.status()["groups"]["busy"]["inflight"] == 0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_slow_consumer_does_not_grow_broker_memory_with_the_backlog(bus: Bus, broker: BrokerProcess) -> None:
    assert broker.proc
    payload = {"blob": "x" * 2000}
    with bus.consume("slow", ["test.backlog.*"], credit=10) as c:
        for p in [bus.publish_nowait("test.backlog.changed", payload) for _ in range(5000)]:
            p.result(30)
        time.sleep(0.5)
        before = _rss_kib(broker.proc.pid)
        for p in [bus.publish_nowait("test.backlog.changed", payload) for _ in range(20000)]:
            p.result(60)  # 40 MB more backlog than the consumer has taken
        time.sleep(0.5)
        after = _rss_kib(broker.proc.pid)
        st = bus.status()["groups"]["slow"]
        assert st["inflight"] <= 10 and st["lag"] >= 24_000
        assert c.fetch(100, timeout=5)
    # The backlog lives in the log (memory-mapped, not resident by force); what the broker holds is bounded.
    assert after - before < 20_000, f"broker RSS grew by {after - before} KiB with a 40 MB backlog"


def test_live_subscriber_that_misses_messages_recovers_them_from_the_log(bus: Bus) -> None:
    with bus.subscribe("test.flood.*", max_queued=50) as sub:
        for chunk in range(30):  # 30 commits, so 30 LIVE frames: the subscriber's queue of 50 overflows
            for p in [bus.publish_nowait("test.flood.changed", {"i": chunk * 100 + i}) for i in range(100)]:
                p.result(30)
        got = [sub.get(timeout=10).payload["i"] for _ in range(3000)]
    assert got == list(range(3000))
    assert bus._conn.counters.gaps_filled >= 1


def test_broker_drops_live_frames_for_a_stuck_subscriber_and_says_where_the_gap_is(tmp_path: Path) -> None:
    # The raw socket sends no heartbeats while the test publishes 40 MB; a loaded machine may take longer
    # than the default 5 s client timeout, and a dropped client would get no frames at all.
    b = BrokerProcess(tmp_path / "home", env={"MEMBUS_LIVE_HWM": "5", "MEMBUS_CLIENT_TIMEOUT_S": "600"}).start()
    try:
        s = _raw_socket(b)
        s.rcvhwm = 5
        s.send_multipart([P.HELLO, P.pack({"client": "stuck"})])
        assert s.recv_multipart()[0] == P.WELCOME
        s.send_multipart([P.SUB, P.pack_id(1), P.pack({"patterns": ["test.stuck.*"]})])
        assert s.recv_multipart()[0] == P.LIVE
        with Bus.connect(b.home.path, module="test") as bus:
            for _ in range(40):  # 40 commits of 1 MB while the subscriber does not read: past its HWM and TCP buffers
                for p in [bus.publish_nowait("test.stuck.changed", {"blob": "x" * 50_000}) for _ in range(20)]:
                    p.result(30)
            last = bus.publish("test.stuck.changed", {"blob": ""})
            wait_until(lambda: bus.status()["counters"].get("live_dropped", 0) > 0, what="drops")
            s.send_multipart([P.PING])
            frames, covered, gaps = 0, 0, 0
            while covered < last:
                f = s.recv_multipart()
                if f[0] != P.LIVE:
                    continue
                first, end, _envs = P.unpack(f[2])
                gaps += first > covered + 1
                covered = max(covered, end)
                frames += 1
            assert gaps >= 1, "a dropped frame must show as a gap in the covered ranges"
            assert b.alive
    finally:
        s.close(0)
        b.stop()


def _raw_socket(broker: BrokerProcess, module: str = "raw") -> zmq.Socket:  # type: ignore[type-arg]
    public, secret = broker.home.module_keys(module)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.curve_serverkey = broker.home.broker_public_key()
    s.curve_publickey, s.curve_secretkey = public, secret
    s.linger = 0
    s.rcvtimeo = 5000
    s.connect(broker.endpoint)
    return s


@contextlib.contextmanager
def _greeted(broker: BrokerProcess) -> Iterator[zmq.Socket]:  # type: ignore[type-arg]
    """A raw client socket past its HELLO, closed on exit."""
    s = _raw_socket(broker)
    try:
        s.send_multipart([P.HELLO, P.pack({"client": "raw", "inbox": ""})])
        assert s.recv_multipart()[0] == P.WELCOME
        yield s
    finally:
        s.close(0)


def _error(s: zmq.Socket) -> dict:  # type: ignore[type-arg]
    while True:
        frames = s.recv_multipart()
        if frames[0] == P.ERROR:
            return dict(P.unpack(frames[2]))


def test_malformed_frames_get_typed_errors_and_the_broker_stays_up(broker: BrokerProcess) -> None:
    s = _raw_socket(broker)
    try:
        s.send_multipart([P.HELLO, P.pack({"client": "raw", "inbox": ""})])
        assert s.recv_multipart()[0] == P.WELCOME
        cases = [
            [b"NOPE"],
            [P.PUB],
            [P.PUB, b"12345678", b"\xc1\xc1 not msgpack"],
            [P.PUB, b"12345678", P.pack([[1, 2, 3]])],
            [P.SUB, b"short", b"{}"],
            [P.JOIN, b"g", b"\xff\xfe"],
            [P.ACK, b"g", P.pack("not a list")],
            [P.REPLAY, b"12345678", P.pack({"patterns": ["a..b"]})],
            [P.REPLAY, b"12345678", P.pack({"from_seq": float("inf")})],  # was no answer: an internal error
            [P.REPLIES, P.pack({"not": "pairs"})],
            [P.REPLIES, P.pack([["id", "corr"]] * (P.MAX_REPLIES_ASKED + 1))],
            [P.HELLO, b"\x92"],
        ]
        for frames in cases:
            s.send_multipart(frames)
            err = _error(s)
            assert err["code"] in ("protocol", "validation", "unknown_client"), (frames, err)
        # a well-formed batch with one bad envelope: that envelope alone is refused, by name
        good = make_envelope("test.fine.changed", msgspec.msgpack.encode(1))
        bad = make_envelope("Not A Topic", msgspec.msgpack.encode(1))
        s.send_multipart([P.PUB, P.pack_id(9), msgspec.msgpack.encode([good, bad])])
        frames = s.recv_multipart()
        assert frames[0] == P.PUBACK
        ok, refused = P.unpack(frames[2])
        assert isinstance(ok, int) and refused[0] == "validation" and "Not A Topic" in refused[1]
        with Bus.connect(broker.home.path, module="test") as bus:
            assert bus.publish("test.after.changed", {"ok": True}) > 0
            counters = bus.status()["counters"]
        assert counters["malformed"] + counters.get("unknown_commands", 0) >= 11
        assert counters.get("internal_errors", 0) == 0
        assert broker.alive
    finally:
        s.close(0)


def test_a_client_without_curve_is_logged_and_counted_by_the_broker(broker: BrokerProcess) -> None:
    """ZeroMQ ends such a connection in its handshake, so the client hears nothing: the broker said nothing either."""
    plain = zmq.Context.instance().socket(zmq.DEALER)
    plain.linger = 0
    try:
        plain.connect(broker.endpoint)
        plain.send_multipart([P.HELLO, P.pack({"client": "plain"})])
        with Bus.connect(broker.home.path, module="test") as bus:
            wait_until(lambda: bus.status()["counters"].get("handshakes_failed", 0) >= 1, timeout=20,
                       what="the failed handshake counted")
        assert "client.handshake_failed" in broker.log_path.read_text()
    finally:
        plain.close(0)


def test_a_join_outside_a_groups_bounds_is_refused_and_the_log_keeps_reaching_lmdb(broker: BrokerProcess) -> None:
    """A group's name keys its saved state in the log's LMDB: a 10,000-byte name made every later copy of the
    journal into LMDB fail, retried for ever. Names, credit, ack timeout, attempts and start are bounded."""
    s = _raw_socket(broker)
    try:
        s.send_multipart([P.HELLO, P.pack({"client": "raw", "inbox": ""})])
        assert s.recv_multipart()[0] == P.WELCOME
        patterns = {"patterns": ["test.>"]}
        for name, body in [(b"g" * 10_000, patterns), (b"g\x00x", patterns), (b"", patterns),
                           (b"g1", {**patterns, "credit": 2**63}), (b"g2", {**patterns, "credit": 0}),
                           (b"g3", {**patterns, "ack_timeout": float("nan")}),
                           (b"g4", {**patterns, "ack_timeout": -1.0}), (b"g5", {**patterns, "max_attempts": 0}),
                           (b"g6", {**patterns, "from_seq": -1})]:
            s.send_multipart([P.JOIN, name, P.pack(body)])
            err = _error(s)
            assert err["code"] == "protocol" and "bad JOIN" in err["message"], (name[:20], body, err)
        with Bus.connect(broker.home.path, module="test") as bus:
            with pytest.raises(ValidationError, match="group name"):  # the client library says so first
                bus.consume("g" * 200, ["test.>"])
            publish_all(bus, "test.after.changed", [{"i": i} for i in range(10)])
            wait_until(lambda: (st := bus.status())["log"]["in_lmdb"] == st["head"], timeout=30,
                       what="the log copied into LMDB")
            status = bus.status()
        assert status["groups"] == {} and status["counters"].get("log_apply_errors", 0) == 0
        assert broker.alive
    finally:
        s.close(0)


def test_one_frame_mixing_good_and_refused_messages_gets_one_answer_each_and_counts_each_refusal_once(
        tmp_path: Path) -> None:
    """The broker checks a batch once per module and topic when all of it passes; when some of it does not, each
    message is checked alone: the refused get their own typed error, the rest are logged."""
    b = BrokerProcess(tmp_path / "home", env={"MEMBUS_MAX_MESSAGE_BYTES": "10000"}).start()
    s = _raw_socket(b)
    try:
        with Bus.connect(b.home.path, module="test") as bus:
            before = bus.status()["counters"]
            s.send_multipart([P.HELLO, P.pack({"client": "raw", "inbox": ""})])
            assert s.recv_multipart()[0] == P.WELCOME
            envs = [make_envelope("test.good.changed", msgspec.msgpack.encode(1)),
                    make_envelope("test.big.changed", msgspec.msgpack.encode("y" * 20_000)),
                    make_envelope("bus.fake.changed", msgspec.msgpack.encode(2)),
                    make_envelope("Not A Topic", msgspec.msgpack.encode(3)),
                    make_envelope("test.good.changed", msgspec.msgpack.encode(4))]
            results = []
            for attempt in range(2):  # the same frame again: the logged two keep their seqs
                s.send_multipart([P.PUB, P.pack_id(attempt), msgspec.msgpack.encode(envs)])
                frames = s.recv_multipart()
                assert frames[0] == P.PUBACK
                results.append(P.unpack(frames[2]))
            first, again = results
            assert isinstance(first[0], int) and first[4] == first[0] + 1
            assert [r[0] for r in first[1:4]] == ["too_large", "not_authorized", "validation"]
            assert again == first
            after = bus.status()["counters"]
            assert {k: after.get(k, 0) - before.get(k, 0) for k in ("too_large", "unauthorized", "invalid")} == \
                {"too_large": 2, "unauthorized": 2, "invalid": 2}
            assert [r.seq for r in bus.replay(from_seq=first[0])] == [first[0], first[4]]
    finally:
        s.close(0)
        b.stop()


def test_oversized_messages_are_refused_with_a_typed_error(tmp_path: Path) -> None:
    b = BrokerProcess(tmp_path / "home", env={"MEMBUS_MAX_MESSAGE_BYTES": "10000"}).start()
    try:
        with Bus.connect(b.home.path, module="test") as bus:
            with pytest.raises(BusError) as info:
                bus.publish("test.big.changed", {"blob": "x" * 20000})
            assert info.value.code == "too_large"
            assert bus.publish("test.small.changed", {"blob": "x" * 100}) > 0
            s = _raw_socket(b)
            try:
                s.send_multipart([P.HELLO, P.pack({"client": "raw"})])
                s.recv_multipart()
                env = make_envelope("test.big.changed", msgspec.msgpack.encode("y" * 9_000_000))
                s.send_multipart([P.PUB, P.pack_id(7), msgspec.msgpack.encode([env])])
                err = _error(s)
                assert err["code"] == "too_large"
            finally:
                s.close(0)
            assert bus.status()["counters"]["too_large"] == 2
    finally:
        b.stop()


def test_client_survives_broker_restart_and_resumes_subscriptions(broker: BrokerProcess) -> None:
    with Bus.connect(broker.home.path, module="test") as bus, bus.subscribe("test.restart.*") as sub:
        bus.publish("test.restart.changed", {"i": 0})
        assert sub.get(timeout=10).payload["i"] == 0
        broker.kill()
        broker.start()
        seq = bus.publish("test.restart.changed", {"i": 1}, timeout=30)
        msg = sub.get(timeout=30)
        assert (msg.seq, msg.payload["i"]) == (seq, 1)
        assert bus._conn.counters.reconnects >= 1
    assert os.path.exists(broker.home.run_file)


def test_a_reply_logged_while_its_requester_was_away_reaches_it_when_it_comes_back(broker: BrokerProcess) -> None:
    """The requester is frozen while the broker is killed and restarted and the reply is logged: the new broker
    has no inbox of it to send the reply to. When it comes back, its request still gets that reply."""
    assert broker.proc is not None
    script = textwrap.dedent("""
        import json, sys
        from bus.client import Bus
        with Bus.connect(sys.argv[1], module="asker", timeout=30) as b:
            print(json.dumps(b.request("test.echo.request", {"q": 1}, timeout=30).payload), flush=True)
    """)
    asker = subprocess.Popen([sys.executable, "-c", script, str(broker.home.path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        with Bus.connect(broker.home.path, module="echo", timeout=30) as b, \
                b.consume("echo", ["test.echo.request"]) as c:
            deliveries = []
            deadline = time.monotonic() + 30
            while not deliveries and time.monotonic() < deadline:
                deliveries = c.fetch(timeout=0.5)
            assert deliveries, "the request never reached the group"
            os.kill(asker.pid, signal.SIGSTOP)
            try:
                broker.kill()
                broker.start()
                env = deliveries[0].message.envelope
                reply = make_envelope("test.echo.complete", msgspec.msgpack.encode({"echo": 1}),
                                      correlation_id=env.correlation_id, causation_id=env.id,
                                      recipient=env.reply_to)
                b.publish_raw(encode_envelope(reply)).result(30)
                c.ack(deliveries)
            finally:
                os.kill(asker.pid, signal.SIGCONT)
        out, err = asker.communicate(timeout=60)
        assert asker.returncode == 0, err[-2000:]
        assert json.loads(out) == {"echo": 1}
    finally:
        if asker.poll() is None:
            asker.kill()
            asker.wait(10)


def test_a_client_greets_a_broker_back_from_a_long_outage_once(broker: BrokerProcess) -> None:
    """Every HELLO (and PING) said while the broker was away was queued and delivered when it came back: the
    broker dropped and greeted the client once per HELLO, and the client joined its groups, resent its publishes
    and asked for its replies once per WELCOME."""
    with Bus.connect(broker.home.path, module="test", timeout=30) as bus, \
            bus.consume("greeted", ["test.greet.*"]) as consumer:
        bus.publish("test.greet.changed", {"i": 0})
        consumer.ack(consumer.fetch(timeout=10))
        broker.kill()
        time.sleep(12)  # several re-HELLOs' worth of silence (heartbeat 1 s, back-off up to 2 s)
        broker.start()
        seq = bus.publish("test.greet.changed", {"i": 1}, timeout=30)
        got: list[int] = []
        deadline = time.monotonic() + 30
        while seq not in got and time.monotonic() < deadline:  # the first again too, if its ack was not saved
            got += [d.seq for d in consumer.fetch(timeout=1)]
        assert seq in got
        time.sleep(2)  # any WELCOME still to come has come
        assert bus._conn.counters.reconnects == 1


def test_log_grows_its_map_under_load_and_refuses_with_store_full_at_its_limit(tmp_path: Path) -> None:
    small = {"MEMBUS_LOG_MAP_SIZE": str(256 << 10), "MEMBUS_LOG_MAX_SIZE": str(4 << 20)}
    broker = BrokerProcess(tmp_path / "home", env=small).start()
    acked: list[tuple[int, int]] = []
    try:
        with Bus.connect(broker.home.path, module="filler") as b:
            refused: list[BusError] = []
            i = 0
            while not refused and i < 20_000:
                window = [(i + k, b.publish_nowait("test.fill.changed", {"i": i + k, "pad": "x" * 1000}))
                          for k in range(200)]
                for n, p in window:
                    try:
                        acked.append((n, p.result(60)))
                    except StoreFull as exc:
                        refused.append(exc)
                i += 200
            assert refused, "the log never filled up"
            assert refused[0].code == "store_full"
            status = b.status()
            assert status["log"]["map_size"] == 4 << 20, "the map did not grow to its limit"
            with pytest.raises(StoreFull):  # still full, and still answering
                b.publish("test.fill.changed", {"i": -1, "pad": "x" * 300_000})
            assert [(m.payload["i"], m.seq) for m in b.replay(topic="test.fill.changed")] == acked
        broker.stop()
        broker.env["MEMBUS_LOG_MAX_SIZE"] = str(64 << 20)
        broker.start()
        with Bus.connect(broker.home.path, module="filler") as b:
            seq = b.publish("test.fill.changed", {"i": -2, "pad": ""})
            assert seq == acked[-1][1] + 1
            assert len(list(b.replay(topic="test.fill.changed"))) == len(acked) + 1
    finally:
        broker.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX resource limits")
def test_the_broker_takes_more_clients_than_its_inherited_soft_limit_of_open_files(tmp_path: Path) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 256:
        pytest.skip("the hard limit of open files is too low to raise")
    broker = BrokerProcess(tmp_path / "home",
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))).start()
    buses: list[Bus] = []
    try:
        for i in range(40):  # left at 32 open files, it stopped answering new clients at about the 18th
            buses.append(Bus.connect(broker.home.path, module="test", timeout=10))
            assert buses[-1].publish("test.clients.changed", {"i": i}, timeout=10) > 0
        assert len(buses[0].status()["clients"]) == 40
    finally:
        for bus in buses:
            bus.close()
        broker.stop()


def test_a_publisher_waits_for_room_when_the_broker_stops_answering_so_its_memory_stays_bounded(
        broker: BrokerProcess) -> None:
    with Bus.connect(broker.home.path, module="test", max_outstanding=1000) as bus:
        seqs = [p.result(60) for p in [bus.publish_nowait("test.room.changed", {"i": i}, timeout=60)
                                       for i in range(5000)]]  # 5x the bound, never waiting: they wait for room
        assert len(set(seqs)) == 5000
        os.kill(broker.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            queued = [bus.publish_nowait("test.room.changed", {"i": i}, timeout=60) for i in range(1000)]
            with pytest.raises(TimeoutError, match="1000 publishes are still unanswered"):
                bus.publish_nowait("test.room.changed", {"i": -1}, timeout=0.5)
            with pytest.raises(TimeoutError, match="still unanswered"):
                bus.publish_many("test.room.changed", [{"i": -2}, {"i": -3}], timeout=0.5)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        later = [p.result(60) for p in queued]
        assert later == list(range(later[0], later[0] + 1000))  # every queued one, in order
        assert bus.publish("test.room.changed", {"i": 0}) == later[-1] + 1  # the refused ones took no seq


def test_a_request_the_broker_refuses_fails_with_the_refusal_not_a_timeout(bus: Bus) -> None:
    pending = bus.request_nowait("bus.sneaky.request", {}, timeout=600)  # a topic reserved for the broker
    with pytest.raises(NotAuthorized, match="reserved for the broker"):
        pending.result(30)  # without the refusal it would wait for a reply that cannot come: TimeoutError


def test_a_request_nobody_answers_fails_by_itself_after_its_timeout(bus: Bus) -> None:
    fired = threading.Event()
    pending = bus.request_nowait("test.nobody.request", {}, timeout=1.0)  # no worker handles it
    pending.add_done_callback(lambda _p: fired.set())
    assert fired.wait(30)  # a done callback hears of it too, without anyone calling result()
    with pytest.raises(TimeoutError, match=r"no reply within 1\.0 s"):
        pending.result(0)


def test_a_replay_page_of_big_messages_is_bounded_in_bytes(broker: BrokerProcess) -> None:
    """A page was up to 1000 records whatever their size: 600 messages of 1 MB took the broker to 3 GB and
    stalled every publisher for seconds while it built one page."""
    big = "x" * 300_000
    with Bus.connect(broker.home.path, module="test") as bus:
        seqs = [bus.publish("test.big.changed", {"i": i, "pad": big}) for i in range(20)]
        with _greeted(broker) as s:
            s.send_multipart([P.REPLAY, b"12345678", P.pack({"from_seq": seqs[0], "limit": 1000})])
            frames = s.recv_multipart()
            assert frames[0] == P.REPLAYED
            next_seq, done, records = P.unpack(frames[2])
            assert 1 <= len(records) <= 8 and not done and next_seq == seqs[0] + len(records)
        assert [m.payload["i"] for m in bus.replay(topic="test.big.*")] == list(range(20))


def test_a_wrong_server_key_is_named_when_the_connection_gives_up(broker: BrokerProcess) -> None:
    """The broker ends every handshake of a client that holds another server key; the client only said the
    broker "did not answer"."""
    wrong, _ = zmq.curve_keypair()
    with pytest.raises(ConnectionError, match="server key") as info:
        Bus.connect(broker.home.path, module="test", endpoint=broker.endpoint, server_key=wrong, timeout=3.0)
    assert info.value.fields["failed_handshakes"] >= 2


def test_a_group_is_handed_big_messages_a_few_megabytes_at_a_time(broker: BrokerProcess) -> None:
    """A worker's credit of 1,500 messages of 900 KB each became one 1.3 GB frame, and the broker served no
    one else while it built it (a rebuild's status polls timed out)."""
    big = "x" * 300_000
    with Bus.connect(broker.home.path, module="test") as bus:
        seqs = [bus.publish("test.bulk.changed", {"i": i, "pad": big}) for i in range(40)]
    with _greeted(broker) as s:
        s.send_multipart([P.JOIN, b"bulk", P.pack({"patterns": ["test.bulk.*"], "credit": 100, "ack_timeout": 60})])
        frames: list[int] = []
        while sum(frames) < len(seqs):
            got = s.recv_multipart()
            if got[0] == P.DELIVER:
                frames.append(len(P.unpack(got[2])))
    assert len(frames) >= 3 and max(frames) <= 15, frames
