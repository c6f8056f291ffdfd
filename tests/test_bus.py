"""The bus end to end: a real broker process, real CurveZMQ sockets, real LMDB log."""

from __future__ import annotations

import asyncio
import builtins
import os
import signal
import subprocess
import sys
import threading
import time

import msgspec
import pytest

from bus.aio import AsyncBus, AsyncConsumer, AsyncSubscription
from bus.client import Bus, Consumer, Subscription, reply_message
from bus.message import Message
from contracts.errors import BusError, ConnectionError, MessageTooLarge, NotAuthorized, ValidationError
from contracts.errors import TimeoutError as BusTimeout
from tests.conftest import BrokerProcess, wait_until
from tests.workers_util import REPO, child_env


def test_publish_is_acknowledged_with_increasing_sequence_numbers(bus: Bus) -> None:
    seqs = [bus.publish("test.item.changed", {"n": i}) for i in range(20)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20
    logged = list(bus.replay(topic="test.item.changed"))
    assert [m.payload["n"] for m in logged] == list(range(20))
    assert all(m.source == "test" for m in logged)


def test_a_retried_publish_with_the_same_id_is_stored_once(bus: Bus) -> None:
    first = bus.publish("test.item.changed", {"n": 1}, message_id="01JRETRY0000000000000000AA")
    again = bus.publish("test.item.changed", {"n": 1}, message_id="01JRETRY0000000000000000AA")
    assert first == again
    assert len([m for m in bus.replay() if m.id == "01JRETRY0000000000000000AA"]) == 1


def test_many_publishes_in_flight_are_all_logged_in_order(bus: Bus) -> None:
    pendings = [bus.publish_nowait("test.burst.changed", {"i": i}) for i in range(5000)]
    seqs = [p.result(30) for p in pendings]
    assert seqs == sorted(seqs)
    assert [m.payload["i"] for m in bus.replay(topic="test.burst.changed")] == list(range(5000))


def test_source_is_set_by_the_broker_from_the_authenticated_key(broker: BrokerProcess) -> None:
    with Bus.connect(broker.home.path, module="alice") as alice:
        seq = alice.publish("test.who.changed", {"claimed_source": "bob"})
        assert alice.source == "alice"
        (msg,) = list(alice.replay(from_seq=seq, to_seq=seq))
        assert msg.source == "alice"


def test_live_subscription_sees_matching_messages_once_and_in_order(bus: Bus) -> None:
    with bus.subscribe("test.*.changed") as sub:
        for i in range(50):
            bus.publish_nowait("test.live.changed", {"i": i})
            bus.publish_nowait("other.live.changed", {"i": i})
            bus.publish_nowait("test.live.deep.changed", {"i": i})
        got = [sub.get(timeout=10) for _ in range(50)]
        assert [m.payload["i"] for m in got] == list(range(50))
        assert {m.topic for m in got} == {"test.live.changed"}
        with pytest.raises(BusTimeout):
            sub.get(timeout=0.3)


def test_subscribe_from_a_past_seq_replays_then_follows(bus: Bus) -> None:
    first = bus.publish("test.hist.changed", {"i": 0})
    bus.publish("test.hist.changed", {"i": 1})
    with bus.subscribe("test.hist.changed", from_seq=first) as sub:
        bus.publish("test.hist.changed", {"i": 2})
        assert [sub.get(timeout=10).payload["i"] for _ in range(3)] == [0, 1, 2]


def test_request_gets_the_correlated_reply(bus: Bus, broker: BrokerProcess) -> None:
    stop = threading.Event()

    def responder() -> None:
        with Bus.connect(broker.home.path, module="echo") as b, b.consume("echo", ["test.echo.request"]) as c:
            while not stop.is_set():
                for d in c.fetch(timeout=0.2):
                    env = d.message.envelope
                    b.publish_raw(_reply(env, {"echo": d.message.payload})).result(5)
                    c.ack([d])

    t = threading.Thread(target=responder, daemon=True)
    t.start()
    try:
        reply = bus.request("test.echo.request", {"hello": "world"}, timeout=20)
        assert reply.payload == {"echo": {"hello": "world"}}
        assert reply.topic == "test.echo.complete"
        trace = list(bus.replay(correlation_id=reply.correlation_id))
        assert [m.topic for m in trace] == ["test.echo.request", "test.echo.complete"]
    finally:
        stop.set()
        t.join(10)


def _reply(env, payload) -> bytes:  # type: ignore[no-untyped-def]
    from contracts.envelope import encode_envelope, make_envelope
    from contracts.registry import encode_payload

    out = make_envelope("test.echo.complete", encode_payload("test.echo.complete", payload),
                        correlation_id=env.correlation_id, causation_id=env.id, recipient=env.reply_to)
    return encode_envelope(out)


def test_a_module_answers_requests_with_reply_and_its_errors_reach_the_requester_typed(
        bus: Bus, broker: BrokerProcess) -> None:
    with Bus.connect(broker.home.path, module="echo") as server, server.consume("echo", ["test.echo.request"]) as c:
        asked = bus.request_nowait("test.echo.request", {"n": 1}, timeout=20)
        refused = bus.request_nowait("test.echo.request", {"n": -1}, timeout=20)
        done = 0
        while done < 2:
            for d in c.fetch(timeout=5):
                n = d.message.payload["n"]
                if n < 0:
                    server.reply(d.message, error=ValidationError("n is negative", field="n"))
                else:
                    server.reply(d.message, {"echo": n})
                c.ack([d])
                done += 1
        reply = reply_message(asked.result(20))
        assert (reply.topic, reply.payload, reply.source) == ("test.echo.complete", {"echo": 1}, "echo")
        with pytest.raises(ValidationError) as failed:
            reply_message(refused.result(20))
        assert failed.value.field == "n" and "negative" in failed.value.message
        plain = next(bus.replay(from_seq=bus.publish("test.plain.changed", {})))
        with pytest.raises(ValidationError):  # nobody waits for an answer to it: it has no reply_to
            server.reply(plain, {})


@pytest.mark.parametrize(("options", "field"), [
    ({"ack_timeout": -1}, "ack_timeout"), ({"ack_timeout": 0}, "ack_timeout"),
    ({"max_attempts": 2**40}, "max_attempts"), ({"from_seq": -5}, "from_seq"), ({"position": 0}, "position")])
def test_what_a_join_may_not_ask_is_refused_by_name_when_consuming(bus: Bus, options: dict, field: str) -> None:
    """The broker refused it at the first fetch, as a malformed JOIN naming no field (ack_timeout=0: ignored)."""
    with pytest.raises(ValidationError) as info:
        bus.consume("bounded", ["test.bounded.*"], **options)
    assert info.value.field == field


def test_an_app_that_left_structlog_alone_sees_only_the_librarys_warnings(broker: BrokerProcess) -> None:
    """Its reconnects and gap fills (info and debug lines) were printed in the application's own output."""
    script = ("import sys, structlog\nfrom bus.client import Bus\n"
              "with Bus.connect(sys.argv[1], module='quiet') as b:\n"
              "    log = structlog.get_logger('membus.client')\n"
              "    log.debug('hidden.debug'); log.info('hidden.info'); log.warning('shown.warning')\n")
    run = subprocess.run([sys.executable, "-c", script, str(broker.home.path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert "shown.warning" in run.stderr and "hidden" not in run.stderr + run.stdout


def test_a_subscription_without_a_pattern_is_refused_at_once(bus: Bus) -> None:
    with pytest.raises(ValidationError) as info:
        bus.subscribe()
    assert info.value.field == "patterns"


def test_answered_requests_leave_no_timeout_entries_behind(bus: Bus, broker: BrokerProcess) -> None:
    """Each request_nowait kept its timeout's heap entry until the timeout passed, answered or not: 30k requests a
    second with a 30 s timeout held ~900k entries."""
    with Bus.connect(broker.home.path, module="echo") as server, server.consume("echo", ["test.echo.request"]) as c:
        pending = [bus.request_nowait("test.echo.request", {"n": i}, timeout=120) for i in range(3000)]
        answered = 0
        while answered < len(pending):
            batch = c.fetch(500, timeout=5)
            for d in batch:
                server.reply_nowait(d.message, {"echo": d.message.payload["n"]})
            c.ack(batch)
            answered += len(batch)
        assert all(p.result(60).topic == "test.echo.complete" for p in pending)
        bus.request_nowait("test.echo.request", {"n": -1}, timeout=120)
        assert len(bus._conn._reply_deadlines) <= 2  # the 3000 answered ones are gone


def test_request_without_a_handler_times_out_with_a_typed_error(bus: Bus) -> None:
    with pytest.raises(BusTimeout) as info:
        bus.request("test.nobody.request", {}, timeout=0.5)
    assert isinstance(info.value, TimeoutError)


def test_a_timeout_that_is_not_seconds_is_refused_at_once(bus: Bus) -> None:
    """A NaN timeout never passed (a busy loop in ``result``, a deadline heap out of order): refused instead."""
    for timeout in (float("nan"), -1.0):
        with pytest.raises(ValidationError) as info:
            bus.request("test.nothing.request", {}, timeout=timeout)
        assert info.value.field == "timeout"
        with pytest.raises(ValidationError):
            bus.publish("test.fine.changed", {}, timeout=timeout)
        with pytest.raises(ValidationError):
            bus.publish_nowait("test.fine.changed", {}).result(timeout)
    assert bus.publish("test.fine.changed", {}, timeout=5.0) > 0


def test_a_consumer_or_subscription_that_could_never_receive_is_refused_at_once(bus: Bus) -> None:
    """A subscription holding at most 0 messages waited for ever; credit outside 1..MAX_CREDIT was refused only
    at the first fetch; a NaN time in replay was a bare ValueError."""
    with pytest.raises(ValidationError) as queued:
        bus.subscribe("test.>", max_queued=0)
    assert queued.value.field == "max_queued"
    for credit in (0, 10**6):
        with pytest.raises(ValidationError) as info:
            bus.consume("never", ["test.>"], credit=credit)
        assert info.value.field == "credit"
    with pytest.raises(ValidationError) as since:
        list(bus.replay(since=float("nan")))
    assert since.value.field == "since"


def test_replay_filters_by_seq_time_topic_and_correlation(bus: Bus) -> None:
    a = bus.publish("test.a.changed", {"i": 1}, correlation_id="trace-1")
    time.sleep(0.05)
    mark = time.time()
    b = bus.publish("test.b.changed", {"i": 2}, correlation_id="trace-1")
    c = bus.publish("test.a.changed", {"i": 3})
    assert [m.seq for m in bus.replay(from_seq=b, to_seq=c)] == [b, c]
    assert [m.seq for m in bus.replay(topic="test.a.*")] == [a, c]
    assert [m.seq for m in bus.replay(since=mark)] == [b, c]
    assert [m.seq for m in bus.replay(correlation_id="trace-1")] == [a, b]
    assert [m.seq for m in bus.replay(correlation_id="trace-1", until=mark)] == [a]  # until was ignored


def test_a_long_trace_replays_whole_in_pages_in_order(bus: Bus) -> None:
    """Each 1000-record page of a trace read and sorted the whole trace again (200k records: 12 s)."""
    first = bus.publish("test.trace.request", {"i": -1}, correlation_id="long-trace")
    for i in range(2500):
        bus.publish_nowait("test.trace.changed", {"i": i}, correlation_id="long-trace")
        if i % 500 == 0:
            bus.publish_nowait("test.other.changed", {"i": i}, correlation_id="another-trace")
    last = bus.publish("test.trace.complete", {"i": 2500}, correlation_id="long-trace")
    got = [m.seq for m in bus.replay(correlation_id="long-trace")]
    assert len(got) == 2502 and got == sorted(set(got)) and (got[0], got[-1]) == (first, last)
    assert [m.payload["i"] for m in bus.replay(correlation_id="long-trace", from_seq=got[1500])] == \
        list(range(1499, 2501))


def test_group_consumer_gets_every_message_and_resumes_after_restart(bus: Bus, broker: BrokerProcess) -> None:
    for i in range(30):
        bus.publish_nowait("test.work.request", {"i": i})
    bus.publish("test.work.request", {"i": 30})
    with bus.consume("workers", ["test.work.*"], credit=10) as c:
        got = []
        while len(got) < 20:
            batch = c.fetch(10, timeout=5)
            assert batch
            got += batch
            c.ack(batch)
        assert [d.message.payload["i"] for d in got] == list(range(20))
    wait_until(lambda: bus.status()["groups"]["workers"]["inflight"] == 0, what="acks processed")
    broker.stop()
    broker.start()
    with Bus.connect(broker.home.path, module="test") as b2, b2.consume("workers", credit=100) as c2:  # a new run
        rest = []
        while len(rest) < 11:
            batch = c2.fetch(100, timeout=10)
            assert batch
            rest += batch
            c2.ack(batch)
        assert [d.message.payload["i"] for d in rest] == list(range(20, 31))


def test_status_reports_head_groups_and_clients(bus: Bus) -> None:
    bus.publish("test.s.changed", {})
    with bus.consume("stat", ["test.>"], credit=5):
        st = wait_until(lambda: (s := bus.status()) and s["groups"].get("stat", {}).get("members") and s,
                        what="group joined")
    assert st["head"] >= 1
    assert st["groups"]["stat"]["lag"] >= 0
    assert any(c["source"] == "test" for c in st["clients"])


def test_payload_is_validated_before_it_leaves_the_client(bus: Bus) -> None:
    import msgspec

    from contracts.registry import register

    class Strict(msgspec.Struct):
        n: int

    register("test.strict.changed", Strict)
    with pytest.raises(ValidationError) as info:
        bus.publish("test.strict.changed", {"n": "x"})
    assert info.value.topic == "test.strict.changed" and info.value.field == "n"
    with pytest.raises(ValidationError):
        bus.publish("Bad Topic", {})


def test_unknown_key_gets_a_clear_error_not_silence(broker: BrokerProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import zmq

    from bus.home import Home

    outsider = Home(tmp_path / "elsewhere")
    public, secret = outsider.module_keys("intruder")
    from bus.connection import Connection

    conn = Connection(endpoint=broker.endpoint, server_key=broker.home.broker_public_key(), public_key=public,
                      secret_key=secret, name="intruder")
    conn.start()
    try:
        wait_until(lambda: conn.fatal is not None, timeout=10, what="rejection")
        assert isinstance(conn.fatal, NotAuthorized)
        with pytest.raises(NotAuthorized):
            conn.submit_publish(b"x", 1.0)
    finally:
        conn.close()
    assert zmq  # the broker counted and logged it
    with Bus.connect(broker.home.path, module="test") as ok:
        assert ok.status()["counters"]["auth_rejected"] >= 1
    assert "auth.rejected" in broker.log_path.read_text()


def test_asyncio_twin_has_the_same_methods(broker: BrokerProcess) -> None:
    async def main() -> None:
        async with await AsyncBus.connect(broker.home.path, module="aio") as abus:
            async with abus.subscribe("aio.>") as sub:
                seq = await abus.publish("aio.thing.changed", {"x": 1})
                msg = await sub.get(timeout=10)
                assert msg.seq == seq and msg.payload == {"x": 1}
            seqs = await asyncio.gather(*[abus.publish("aio.many.changed", {"i": i}) for i in range(200)])
            assert sorted(seqs) == seqs or len(set(seqs)) == 200
            replayed = [m async for m in abus.replay(topic="aio.many.changed")]
            assert len(replayed) == 200
            assert (await abus.status())["head"] >= 201
            with pytest.raises(BusTimeout):
                await abus.request("aio.none.request", {}, timeout=0.3)
            async with abus.consume("aio-group", ["aio.thing.*"]) as c:
                batch = await c.fetch(10, timeout=5)
                assert [d.seq for d in batch] == [seq]
                await c.ack(batch)

    asyncio.run(main())


def test_an_async_call_abandoned_with_its_event_loop_leaves_the_connection_working(broker: BrokerProcess) -> None:
    """Its answer comes when the loop that awaited it is closed: that must not end the client's I/O thread."""
    assert broker.proc is not None
    abus = asyncio.run(AsyncBus.connect(broker.home.path, module="aio-late"))

    async def abandon() -> None:
        with pytest.raises(builtins.TimeoutError):
            await asyncio.wait_for(abus.publish("aio.late.changed", {"i": 1}), 0.2)

    async def publish_again() -> int:
        seq: int = await abus.publish("aio.late.changed", {"i": 2}, timeout=20)
        return seq

    os.kill(broker.proc.pid, signal.SIGSTOP)  # the first answer comes after its loop has closed
    try:
        asyncio.run(abandon())
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    try:
        assert asyncio.run(publish_again()) == 2
    finally:
        asyncio.run(abus.close())


def test_iterating_a_subscription_ends_when_its_bus_is_closed(broker: BrokerProcess) -> None:
    bus = Bus.connect(broker.home.path, module="sub-close")
    sub = bus.subscribe("test.close.>")
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.extend(m.payload["i"] for m in sub), daemon=True)
    reader.start()
    bus.publish("test.close.changed", {"i": 1})
    wait_until(lambda: got == [1], what="the message")
    bus.close()
    reader.join(10)
    assert not reader.is_alive()
    with pytest.raises(ConnectionError):
        sub.get(timeout=1)

    async def main() -> list[int]:
        abus = await AsyncBus.connect(broker.home.path, module="sub-close-aio")
        seen: list[int] = []

        async def read() -> None:
            async for m in abus.subscribe("test.close.>"):
                seen.append(m.payload["i"])

        task = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        await abus.publish("test.close.changed", {"i": 2})
        while not seen:
            await asyncio.sleep(0.01)
        await abus.close()
        await asyncio.wait_for(task, 10)
        return seen

    assert asyncio.run(main()) == [2]


def test_a_cancelled_async_fetch_takes_nothing(broker: BrokerProcess) -> None:
    async def main() -> list[int]:
        async with (await AsyncBus.connect(broker.home.path, module="aio-cancel") as abus,
                    abus.consume("aio-cancel", ["aio.cancel.*"], ack_timeout=60) as c):
            with pytest.raises(builtins.TimeoutError):
                await asyncio.wait_for(c.fetch(timeout=None), 0.3)
            await abus.publish("aio.cancel.changed", {"i": 1})
            got = await c.fetch(timeout=10)
            await c.ack(got)
            return [d.message.payload["i"] for d in got]

    assert asyncio.run(main()) == [1]


def test_the_asyncio_twin_has_every_public_name_of_the_sync_client() -> None:
    def names(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    for sync, twin in ((Bus, AsyncBus), (Subscription, AsyncSubscription), (Consumer, AsyncConsumer)):
        assert names(sync) <= names(twin), (twin.__name__, names(sync) - names(twin))
        assert not hasattr(sync, "__iter__") or hasattr(twin, "__aiter__"), twin.__name__


def test_a_consumer_iterates_until_closed_and_a_closed_one_says_so(broker: BrokerProcess) -> None:
    """`async for` over an AsyncConsumer was a TypeError; fetch on a closed consumer returned [] for ever."""
    with Bus.connect(broker.home.path, module="cons-close") as bus:
        consumer = bus.consume("cons-close", ["cons.close.*"], ack_timeout=60)
        consumer.close()
        with pytest.raises(ConnectionError, match="closed"):
            consumer.fetch(timeout=1)
        assert list(consumer) == []

    async def main() -> list[int]:
        async with await AsyncBus.connect(broker.home.path, module="cons-close-aio") as abus:
            consumer = abus.consume("cons-close-aio", ["cons.close.*"], ack_timeout=60)
            seen: list[int] = []

            async def read() -> None:
                async for delivery in consumer:
                    seen.append(delivery.message.payload["i"])
                    await consumer.ack([delivery])

            task = asyncio.create_task(read())
            await abus.publish("cons.close.changed", {"i": 1})
            await abus.publish("cons.close.changed", {"i": 2})
            while len(seen) < 2:
                await asyncio.sleep(0.01)
            consumer.close()
            await asyncio.wait_for(task, 10)
            with pytest.raises(ConnectionError):
                await consumer.fetch(timeout=1)
            return seen

    assert asyncio.run(main()) == [1, 2]


def test_timeouts_that_are_not_finite_seconds_are_refused_before_anything_is_sent(bus: Bus,
                                                                                    broker: BrokerProcess) -> None:
    with pytest.raises(ValidationError):
        bus.publish("test.inf.changed", {"i": 1}, timeout=float("inf"))

    async def main() -> None:
        async with await AsyncBus.connect(broker.home.path, module="aio-timeouts") as abus:
            with pytest.raises(ValidationError):
                await abus.status(timeout=float("nan"))
            with pytest.raises(ValidationError):
                [m async for m in abus.replay(timeout=-1)]

    asyncio.run(main())
    abus = asyncio.run(AsyncBus.connect(broker.home.path, module="aio-no-loop"))
    try:
        with pytest.raises(RuntimeError):
            abus.publish_nowait("test.inf.changed", {"i": 2})  # no running loop to answer in
    finally:
        asyncio.run(abus.close())
    assert [m.payload for m in bus.replay(topic="test.inf.changed", timeout=10)] == []


def test_a_publish_the_broker_refuses_whole_frees_its_place_and_takes_no_other_down(broker: BrokerProcess) -> None:
    with Bus.connect(broker.home.path, module="too-big", max_outstanding=3) as bus:
        for _ in range(4):  # over the frame limit: refused before it is sent, its place freed
            with pytest.raises(MessageTooLarge):
                bus.publish("test.big.changed", {"blob": "x" * 5_000_000}, timeout=10)
        small = [bus.publish_nowait("test.big.changed", {"i": i}, timeout=20) for i in range(2)]
        over_payload_limit = bus.publish_nowait("test.big.changed", {"blob": "x" * 2_000_000}, timeout=20)
        big = bus.publish_nowait("test.big.changed", {"blob": "x" * 5_000_000}, timeout=20)
        assert all(isinstance(p.result(20), int) for p in small)
        for p in (over_payload_limit, big):
            with pytest.raises(MessageTooLarge):
                p.result(20)
        assert isinstance(bus.publish("test.big.changed", {"i": 9}, timeout=20), int)


def test_publish_to_a_reserved_topic_is_refused(bus: Bus, broker: BrokerProcess) -> None:
    with pytest.raises(BusError) as info:
        bus.publish("bus.deadletter", {"fake": True})
    assert info.value.code == "not_authorized"
    with Bus.connect(broker.home.path, module="worker-evil") as evil, pytest.raises(NotAuthorized):
        evil.publish("bus.deadletter", {"fake": True})  # only the workers that exist write dead letters


def test_a_consumer_that_keeps_its_own_position_repositions_its_group(bus: Bus) -> None:
    seqs = [bus.publish("test.pos.changed", {"i": i}) for i in range(6)]
    with bus.consume("positioned", ["test.pos.*"], credit=10) as c:
        got = c.fetch(10, timeout=5)
        c.ack(got)
        assert [d.seq for d in got] == seqs
    wait_until(lambda: bus.status()["groups"]["positioned"]["members"] == 0, what="left")
    # from_seq is where a new group starts: this one goes on where it was
    with bus.consume("positioned", from_seq=1, credit=10) as c:
        assert c.fetch(10, timeout=0.5) == []
    wait_until(lambda: bus.status()["groups"]["positioned"]["members"] == 0, what="left")
    # a rebuilt store starts again from the beginning of the log
    with bus.consume("positioned", position=1, credit=10) as c:
        assert [d.seq for d in c.fetch(10, timeout=5)] == seqs
    wait_until(lambda: bus.status()["groups"]["positioned"]["members"] == 0, what="left")
    # a store ahead of the broker's floor skips what it already applied
    with bus.consume("positioned", position=seqs[4], credit=10) as c:
        assert [d.seq for d in c.fetch(10, timeout=5)] == seqs[4:]


def test_members_of_one_module_joining_a_group_with_from_seq_share_it(bus: Bus, broker: BrokerProcess) -> None:
    """from_seq used to mean "I keep my own position": each member joining with it replaced the other (a new
    run of a store worker), which rejoined and replaced it in turn, every message delivered to both."""
    start = bus.publish("test.share.changed", {"i": -1}) + 1
    with Bus.connect(broker.home.path, module="test") as other, \
            bus.consume("shared", ["test.share.*"], from_seq=start, credit=5) as a, \
            other.consume("shared", ["test.share.*"], from_seq=start, credit=5) as b:
        wait_until(lambda: bus.status()["groups"]["shared"]["members"] == 2, what="both joined")
        seqs = bus.publish_many("test.share.changed", [{"i": i} for i in range(60)])
        got: list[int] = []
        deadline = time.monotonic() + 30
        while len(got) < len(seqs) and time.monotonic() < deadline:
            for member in (a, b):
                batch = member.fetch(5, timeout=0.1)
                member.ack(batch)
                got += [d.seq for d in batch]
        assert sorted(got) == seqs  # each once, none before from_seq
        assert bus.status()["groups"]["shared"]["members"] == 2
        assert bus._conn.counters.reconnects == other._conn.counters.reconnects == 0


def test_publish_many_logs_every_payload_once_in_order_and_returns_their_seqs(bus: Bus) -> None:
    payloads = [{"i": i, "pad": "x" * (i % 700)} for i in range(2600)]  # several chunks and frames
    seqs = bus.publish_many("test.bulk.changed", payloads)
    assert len(seqs) == 2600 and seqs == sorted(seqs) and len(set(seqs)) == 2600
    logged = list(bus.replay(topic="test.bulk.changed"))
    assert [m.payload for m in logged] == payloads
    assert [m.seq for m in logged] == seqs
    assert all(m.source == "test" and m.correlation_id == m.id for m in logged)
    assert len({m.id for m in logged}) == 2600 and [m.id for m in logged] == sorted(m.id for m in logged)


def test_publish_many_shares_frames_with_single_publishes_and_each_gets_its_own_answer(bus: Bus) -> None:
    singles = [bus.publish_nowait("test.mixed.changed", {"single": i}) for i in range(300)]
    many = bus.publish_many_nowait("test.mixed.changed", [{"bulk": i} for i in range(300)])
    more = [bus.publish_nowait("test.mixed.changed", {"single": i}) for i in range(300, 310)]
    single_seqs = [p.result(30) for p in singles + more]
    bulk_seqs = many.result(30)
    assert len(set(single_seqs) | set(bulk_seqs)) == 610
    by_seq = {m.seq: m.payload for m in bus.replay(topic="test.mixed.changed")}
    assert [by_seq[s] for s in bulk_seqs] == [{"bulk": i} for i in range(300)]
    assert [by_seq[s] for s in single_seqs] == [{"single": i} for i in range(310)]


def test_a_retried_publish_many_with_the_same_ids_is_stored_once(bus: Bus) -> None:
    ids = [f"01JBULKRETRY00000000000{i:03d}" for i in range(40)]
    first = bus.publish_many("test.bulk.changed", [{"i": i} for i in range(40)], message_ids=ids)
    head = bus.status()["head"]
    again = bus.publish_many("test.bulk.changed", [{"i": i} for i in range(40)], message_ids=ids)
    assert again == first and bus.status()["head"] == head
    with pytest.raises(ValueError):
        bus.publish_many("test.bulk.changed", [{"i": 1}], message_ids=ids)


def test_publish_many_checks_every_payload_first_and_names_the_bad_one(bus: Bus) -> None:
    import msgspec

    from contracts.registry import register

    class Strict(msgspec.Struct):
        n: int

    register("test.strictbulk.changed", Strict)
    head = bus.status()["head"]
    with pytest.raises(ValidationError) as info:
        bus.publish_many("test.strictbulk.changed", [{"n": 1}, {"n": 2}, {"n": "three"}, {"n": 4}])
    assert info.value.field == "n" and info.value.fields["index"] == 2
    assert bus.status()["head"] == head  # nothing was sent
    assert bus.publish_many("test.strictbulk.changed", []) == []


def test_publish_many_of_one_and_raw_envelopes_in_one_call(bus: Bus) -> None:
    from contracts.envelope import encode_new

    (one,) = bus.publish_many("test.one.changed", [{"i": 1}])
    raw = [encode_new("test.one.changed", msgspec.msgpack.encode({"i": i}))[1] for i in range(2, 5)]
    single = bus.publish_raw_many(raw[:1]).result(30)
    three = bus.publish_raw_many(raw).result(30)
    assert len(single) == 1 and three[0] == single[0] and one < single[0] < three[1] < three[2]
    assert [m.payload["i"] for m in bus.replay(topic="test.one.changed")] == [1, 2, 3, 4]


def test_publish_many_refused_by_the_broker_says_which_and_what_was_logged(bus: Bus) -> None:
    with pytest.raises(BusError) as info:
        bus.publish_many("bus.fake.changed", [{"i": i} for i in range(3)])
    assert info.value.code == "not_authorized"
    assert info.value.fields["index"] == 0 and info.value.fields["seqs"] == [None, None, None]


def test_asyncio_publish_many(broker: BrokerProcess) -> None:
    async def main() -> list[int]:
        async with await AsyncBus.connect(broker.home.path, module="aio") as abus:
            return await abus.publish_many("aio.bulk.changed", [{"i": i} for i in range(1500)])

    seqs = asyncio.run(main())
    with Bus.connect(broker.home.path, module="test") as bus:
        logged = list(bus.replay(topic="aio.bulk.changed"))
    assert [m.seq for m in logged] == seqs and [m.payload["i"] for m in logged] == list(range(1500))


def test_a_plain_library_user_gets_payloads_checked_against_the_built_in_contracts(broker: BrokerProcess) -> None:
    """Without importing the catalog, `Bus.connect` and `membus publish` logged payloads that broke their contract."""
    script = ("import sys\nfrom bus import Bus\nfrom contracts.errors import ValidationError\n"
              "with Bus.connect(sys.argv[1], module='plain') as bus:\n"
              "    try:\n        bus.publish('memory.store.request', {})\n"
              "    except ValidationError as exc:\n        print('refused', exc.fields.get('field'))\n")
    done = subprocess.run([sys.executable, "-c", script, str(broker.home.path)], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "refused user_id", done.stdout + done.stderr


def test_a_waiting_async_subscription_sleeps_until_a_message_wakes_it(broker: BrokerProcess) -> None:
    """It looked at its queue every 5 ms: 20 idle subscriptions took 4 % of a core, and a message waited up to
    5 ms for the next look."""
    async def main() -> tuple[int, int]:
        async with await AsyncBus.connect(broker.home.path, module="aio-wake") as abus:
            sub = abus.subscribe("aio.wake.*")
            looks = 0
            take = sub._sub.get

            def counted(timeout: float | None = None) -> Message:
                nonlocal looks
                looks += 1
                return take(timeout=timeout)

            sub._sub.get = counted  # type: ignore[method-assign]
            with pytest.raises(builtins.TimeoutError):
                await sub.get(timeout=1.0)
            idle_looks = looks
            waiting = asyncio.create_task(sub.get(timeout=30))
            await asyncio.sleep(0.1)
            await abus.publish("aio.wake.changed", {"i": 7})
            got = await asyncio.wait_for(waiting, 30)
            return idle_looks, got.payload["i"]

    idle_looks, value = asyncio.run(main())
    assert value == 7 and idle_looks <= 10, idle_looks


def test_a_logged_payload_that_breaks_its_contract_is_shown_with_the_reason(bus: Bus) -> None:
    """The broker logs payloads undecoded; one that breaks its topic's contract (published raw by another
    client) showed only the error, not what was logged."""
    import contracts.structured  # noqa: F401  (memory.store.request's contract)
    from contracts.envelope import encode_new

    _, data = encode_new("memory.store.request", msgspec.msgpack.encode({"unexpected": [1, 2]}))
    seq = bus.publish_raw(data).result(10)
    [logged] = [m.to_dict() for m in bus.replay(from_seq=seq, to_seq=seq)]
    assert logged["payload"] == {"unexpected": [1, 2]} and "memory.store.request" in logged["payload_error"]


def test_a_positioned_consumer_gets_what_it_left_unacked_again_after_a_broker_restart(
        bus: Bus, broker: BrokerProcess) -> None:
    seqs = [bus.publish("test.rejoin.changed", {"i": i}) for i in range(4)]
    with bus.consume("rejoiner", ["test.rejoin.*"], position=seqs[0], credit=10) as c:
        got: list = []
        while len(got) < 4:
            got += c.fetch(10, timeout=5)
        c.nack(got[:1], "not now", delay=600)  # handed back for later; the later ones are done
        c.ack(got[1:])
        wait_until(lambda: bus.status()["groups"]["rejoiner"]["inflight"] == 0, what="acks processed")
        broker.kill()
        broker.start()
        again = c.fetch(10, timeout=15)
        assert seqs[0] in [d.seq for d in again]


@pytest.mark.parametrize("bad", [{"headers": {"k": ["v"]}}, {"headers": {"k": b"v"}}, {"headers": {"k": None}},
                                 {"correlation_id": b"c1"}, {"message_id": 7}])
def test_a_publish_with_ids_or_headers_that_are_not_text_is_refused_alone_before_sending(bus: Bus, bad: dict) -> None:
    others = [bus.publish_nowait("test.hdr.changed", {"i": i}) for i in range(50)]
    with pytest.raises(ValidationError) as refused:
        bus.publish_nowait("test.hdr.changed", {"i": -1}, **bad)
    assert refused.value.field == next(iter(bad))
    with pytest.raises(ValidationError):
        bus.publish_many("test.hdr.changed", [{"i": -1}], message_ids=[b"01JBYTES0000000000000000AA"])  # type: ignore[list-item]
    assert all(isinstance(p.result(10), int) for p in others)  # the frame they shared was not refused for it


def test_a_wait_for_messages_with_a_timeout_that_is_not_a_number_of_seconds_is_refused(bus: Bus) -> None:
    outcome: list[BaseException] = []

    def wait(call) -> None:  # type: ignore[no-untyped-def]
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)

    with bus.subscribe("test.nan.*") as sub, bus.consume("nan", ["test.nan.*"]) as consumer:
        aio_sub, aio_consumer = AsyncSubscription(sub), AsyncConsumer(consumer)
        for call in (lambda: sub.get(timeout=float("nan")), lambda: consumer.fetch(timeout=float("nan")),
                     lambda: asyncio.run(aio_sub.get(timeout=float("nan"))),
                     lambda: asyncio.run(aio_consumer.fetch(timeout=float("nan")))):
            waiter = threading.Thread(target=wait, args=(call,), daemon=True)  # it span for ever
            waiter.start()
            waiter.join(10)
            assert isinstance(outcome.pop(), ValidationError)


def delivered_after_a_broker_restart(bus: Bus, broker: BrokerProcess, consumer: Consumer, topic: str) -> object:
    """Kills and restarts the broker, publishes one message on ``topic``: "only what came after" if the consumer
    is then handed that message alone, else the seqs it was handed."""
    broker.kill()
    broker.start()
    later = bus.publish(topic, {"i": -1}, timeout=20)
    again: list[int] = []
    while later not in again:
        more = consumer.fetch(10, timeout=15)
        assert more, "the message published after the restart never came"
        again += [d.seq for d in more]
    return "only what came after" if again == [later] else again


def test_a_positioned_consumer_that_acked_everything_resumes_after_it_when_the_broker_restarts(
        bus: Bus, broker: BrokerProcess) -> None:
    """The member tracked the attempt numbers of its deliveries as their seqs: after every broker restart it
    rejoined at seq 1 and the whole log was delivered to it again (every store worker, at every restart)."""
    bus.publish_many("test.before.changed", [{"i": i} for i in range(5)])
    seqs = [bus.publish("test.resume.changed", {"i": i}) for i in range(4)]
    with bus.consume("resumer", ["test.resume.*"], position=seqs[0], credit=10) as c:
        got: list = []
        while len(got) < 4:
            got += c.fetch(10, timeout=5)
        c.ack(got)
        wait_until(lambda: bus.status()["groups"]["resumer"]["inflight"] == 0, what="acks processed")
        assert delivered_after_a_broker_restart(bus, broker, c, "test.resume.changed") == "only what came after"


def test_a_positioned_consumer_does_not_get_a_dead_lettered_message_again_after_a_broker_restart(
        bus: Bus, broker: BrokerProcess) -> None:
    """Nacked until the broker dead-lettered it (its default max_attempts): the member kept it as unsettled,
    rejoined a restarted broker at it, and it went through every attempt and to dead letters once more."""
    seqs = [bus.publish("test.poison.changed", {"i": i}) for i in range(3)]
    with bus.consume("nacker", ["test.poison.*"], position=seqs[0], credit=10) as c:
        dead = 0
        while dead < 1:
            for d in c.fetch(10, timeout=5):
                if d.seq != seqs[1]:
                    c.ack([d])
                    continue
                c.nack([d], "always fails")
                dead += d.attempt >= int((bus._conn.welcome or {})["max_attempts"])
        wait_until(lambda: bus.status()["groups"]["nacker"]["dead_letters"] == 1, what="dead-lettered")
        wait_until(lambda: bus.status()["groups"]["nacker"]["inflight"] == 0, what="acks processed")
        assert delivered_after_a_broker_restart(bus, broker, c, "test.poison.changed") == "only what came after"
    letters = [m for m in bus.replay(topic="bus.deadletter")]
    assert len(letters) == 1

