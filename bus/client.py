"""The synchronous client: publish, request, subscribe, replay, consume.

    from bus import Bus

    with Bus.connect(module="notes") as bus:
        seq = bus.publish("notes.note.changed", {"id": 1})
        reply = bus.request("working.recent.request", {"conversation_id": "c1"}, timeout=2.0)
        with bus.subscribe("notes.>") as sub:
            for msg in sub: ...

bus/aio.py is the asyncio twin with the same method names.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import structlog

from bus import logs
from bus import protocol as P
from bus.connection import (
    MAX_BATCH,
    MAX_BATCH_BYTES,
    MAX_OUTSTANDING,
    Connection,
    GroupState,
    LiveState,
    Pending,
    decode_replayed,
    seconds,
)
from bus.home import Home
from bus.message import Delivery, Message
from contracts.catalog import load_all
from contracts.envelope import (
    ID_MAX,
    Envelope,
    check_header_fields,
    encode_envelope,
    encode_many,
    encode_new,
    make_envelope,
)
from contracts.errors import BusError, ConnectionError, TimeoutError, ValidationError, error_from_wire
from contracts.registry import encode_payload
from contracts.topics import FAILED, check_pattern, check_topic, reply_topics

log = structlog.get_logger("membus.client")
T = TypeVar("T")
_sub_ids = itertools.count(1)


def _connection(home: Path | str | None, module: str, endpoint: str | None, server_key: bytes | None,
                timeout: float, max_outstanding: int = MAX_OUTSTANDING) -> Connection:
    h = Home(home)
    public, secret = h.module_keys(module, create=True)

    def resolve() -> str | None:
        run = h.read_run_file()
        return str(run["endpoint"]) if run else None

    deadline = time.monotonic() + timeout
    ep = endpoint or resolve()
    while ep is None:
        if time.monotonic() > deadline:
            raise ConnectionError(f"no broker is running for {h.path} (start it with `membus up`)",
                                  home=str(h.path))
        time.sleep(0.05)
        ep = resolve()
    key = server_key or h.broker_public_key()
    conn = Connection(endpoint=ep, server_key=key, public_key=public, secret_key=secret, name=module,
                      resolve_endpoint=None if endpoint else resolve, max_outstanding=max_outstanding)
    conn.start()
    left = max(0.0, deadline - time.monotonic())
    while not conn.connected.wait(min(0.05, left) if left > 0 else 0):
        if conn.fatal is not None:
            conn.close()
            raise conn.fatal
        if time.monotonic() > deadline:
            conn.close()
            why = ("; it ended every handshake: is the server key the broker's (keys/broker.key of its home)?"
                   if conn.failed_handshakes >= 2 else "")
            raise ConnectionError(f"the broker at {ep} did not answer within {timeout} s{why}", endpoint=ep,
                                  failed_handshakes=conn.failed_handshakes)
        left = max(0.0, deadline - time.monotonic())
    return conn


def build_request(topic: str, payload: Any, inbox: str, correlation_id: str, headers: dict[str, str] | None,
                  message_id: str | None) -> Envelope:
    check_topic(topic)
    if correlation_id or headers or message_id:
        check_header_fields(message_id, correlation_id, "", headers)
    return make_envelope(topic, encode_payload(topic, payload), correlation_id=correlation_id, reply_to=inbox,
                         headers=headers, message_id=message_id)


def reply_message(env: Envelope) -> Message:
    """A ``.complete`` reply as a Message; a ``.failed`` one raised as its typed error."""
    msg = Message(env)
    if env.topic.endswith("." + FAILED):
        raise error_from_wire(msg.payload if isinstance(msg.payload, dict) else {"message": str(msg.payload)})
    return msg


def replay_body(*, topic: str | None, from_seq: int, to_seq: int | None, since: float | None,
                until: float | None, correlation_id: str | None) -> dict[str, Any]:
    for name, t in (("since", since), ("until", until)):
        if t is not None and not -1e11 < t < 1e11:  # NaN too
            raise ValidationError(f"{name} is not a unix time in seconds: {t!r}", field=name,
                                  expected="unix seconds")
    return {
        "from_seq": from_seq, "to_seq": to_seq,
        "patterns": [check_pattern(topic)] if topic else [],
        "since_ns": int(since * 1e9) if since is not None else None,
        "until_ns": int(until * 1e9) if until is not None else None,
        "correlation_id": correlation_id or "", "limit": 1000,
    }


_CHUNK_BYTES = MAX_BATCH_BYTES // 2
_ENVELOPE_BYTES = 96
"""An envelope's bytes besides its payload, roughly (a ULID twice, the topic, a timestamp)."""


def _chunk_bounds(sizes: list[int]) -> Iterator[tuple[int, int]]:
    """Splits envelopes of ``sizes`` into chunks that a PUB frame holds (MAX_BATCH messages, well under
    MAX_BATCH_BYTES): the connection adds whole chunks to a frame."""
    start, size = 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= MAX_BATCH or size + n > _CHUNK_BYTES):
            yield start, i
            start, size = i, 0
        size += n
    if start < len(sizes):
        yield start, len(sizes)


class Bus:
    """A connection to the broker. Thread-safe; one per process is plenty."""

    def __init__(self, conn: Connection, home: Home) -> None:
        self._conn = conn
        self.home = home

    @classmethod
    def connect(cls, home: Path | str | None = None, *, module: str = "app", endpoint: str | None = None,
                server_key: bytes | None = None, timeout: float = 10.0,
                max_outstanding: int = MAX_OUTSTANDING) -> Bus:
        """Connects as ``module`` to the broker of ``home`` (``MEMBUS_HOME`` or the user data dir).

        ``max_outstanding``: publishes not yet answered (queued or in flight) before a publish call waits for
        room, and raises TimeoutError after its timeout if none comes: memory stays bounded."""
        load_all()  # every built-in topic's contract: payloads are checked before they are sent
        if not structlog.is_configured():  # an app that left structlog alone: its defaults print to stdout
            structlog.configure(logger_factory=logs.stderr_loggers(),
                                wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        return cls(_connection(home, module, endpoint, server_key, timeout, max_outstanding), Home(home))

    @property
    def source(self) -> str:
        """The module identity the broker authenticated this client as."""
        return str((self._conn.welcome or {}).get("source", ""))

    @property
    def ordered_ids_from(self) -> int | None:
        """The first log seq whose worker replies carry ids ordered by seq (workers.apply.derived_id), as the
        broker last said; None: a broker that predates them."""
        return self._conn.ordered_ids_from

    @property
    def inbox(self) -> str:
        return self._conn.inbox

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- publish and request ---------------------------------------------------------------------

    def publish_nowait(self, topic: str, payload: Any, *, correlation_id: str = "", causation_id: str = "",
                       headers: dict[str, str] | None = None, message_id: str | None = None,
                       timeout: float = 30.0) -> Pending:
        """Queues a publish; ``.result()`` of what it returns is the seq once the message is durable."""
        check_topic(topic)
        if correlation_id or causation_id or headers or message_id:
            check_header_fields(message_id, correlation_id, causation_id, headers)
        _, data = encode_new(topic, encode_payload(topic, payload), correlation_id=correlation_id,
                             causation_id=causation_id, headers=headers, message_id=message_id)
        return self._conn.submit_publish(data, timeout)

    def publish(self, topic: str, payload: Any, *, correlation_id: str = "", causation_id: str = "",
                headers: dict[str, str] | None = None, message_id: str | None = None,
                timeout: float = 10.0) -> int:
        """Publishes and returns the message's sequence number once it is durably in the log."""
        p = self.publish_nowait(topic, payload, correlation_id=correlation_id, causation_id=causation_id,
                                headers=headers, message_id=message_id, timeout=timeout)
        return int(p.result(timeout + 1.0))

    def publish_many_nowait(self, topic: str, payloads: Iterable[Any], *,
                            message_ids: Sequence[str] | None = None, timeout: float = 30.0) -> Pending:
        """Queues one message per payload on ``topic``; ``.result()`` is their seqs, in order, once all
        are durable. Cheaper per message than ``publish_nowait``: one id block, one encoder call and one
        Pending per chunk of up to 1,024 messages.

        Every payload is checked against the topic's contract before anything is sent; a ValidationError
        names the payload's ``index``. Pass ``message_ids`` (one per payload) to retry a call safely: the
        broker logs each id once. If the broker refuses some messages, ``.result()`` raises the first
        refusal's error, with ``index`` and every message's ``seqs`` (None where refused) in its fields.
        """
        check_topic(topic)
        encoded: list[bytes] = []
        for index, payload in enumerate(payloads):
            try:
                encoded.append(encode_payload(topic, payload))
            except BusError as exc:
                exc.fields["index"] = index
                raise
        if message_ids is not None and len(message_ids) != len(encoded):
            raise ValueError(f"{len(message_ids)} message_ids for {len(encoded)} payloads")
        bad = None if message_ids is None else next(
            (i for i, m in enumerate(message_ids) if not (isinstance(m, str) and 0 < len(m) <= ID_MAX)), None)
        if bad is not None:
            raise ValidationError(f"message_ids[{bad}] is not 1 to {ID_MAX} characters", field="message_ids",
                                  index=bad, expected=f"1 to {ID_MAX} characters")
        chunks = [(encode_many(topic, encoded[start:end], None if message_ids is None else message_ids[start:end]),
                   end - start) for start, end in _chunk_bounds([len(p) + _ENVELOPE_BYTES for p in encoded])]
        return self._conn.submit_publish_many(chunks, timeout)

    def publish_many(self, topic: str, payloads: Iterable[Any], *, message_ids: Sequence[str] | None = None,
                     timeout: float = 30.0) -> list[int]:
        """Publishes one message per payload on ``topic`` and returns their seqs once all are durable."""
        p = self.publish_many_nowait(topic, payloads, message_ids=message_ids, timeout=timeout)
        return list(p.result(timeout + 1.0))

    def publish_raw(self, data: bytes, *, timeout: float = 10.0) -> Pending:
        """Publishes an already encoded envelope."""
        return self._conn.submit_publish(data, timeout)

    def publish_raw_many(self, envelopes: Sequence[bytes], *, timeout: float = 10.0) -> Pending:
        """Publishes already encoded envelopes (workers' outboxes use this); ``.result()`` is their seqs."""
        return self._conn.submit_publish_many(
            [(b"".join(envelopes[start:end]), end - start)
             for start, end in _chunk_bounds(list(map(len, envelopes)))], timeout)

    def request_nowait(self, topic: str, payload: Any, *, timeout: float = 10.0, correlation_id: str = "",
                       headers: dict[str, str] | None = None) -> Pending:
        """Sends a request; ``.result()`` of what it returns is the reply envelope (keeps many in flight).

        Use ``reply_message(envelope)`` to turn it into a Message, raising a ``.failed`` reply's error. If the
        broker refuses the request itself (a full disk, a topic the module may not use), ``.result()`` raises
        that refusal at once; with no reply within ``timeout``, it fails with TimeoutError by itself (so done
        callbacks run then too).
        """
        check_topic(topic)
        if correlation_id or headers:
            check_header_fields(None, correlation_id, "", headers)
        mid, data = encode_new(topic, encode_payload(topic, payload), correlation_id=correlation_id,
                               reply_to=self._conn.inbox, headers=headers)
        waiter = self._conn.await_reply(mid, topic, correlation_id or mid, timeout)
        self._conn.submit_publish(data, timeout).add_done_callback(functools.partial(self._conn.reply_refused, mid))
        return waiter

    def request(self, topic: str, payload: Any, *, timeout: float = 10.0, correlation_id: str = "",
                headers: dict[str, str] | None = None) -> Message:
        """Publishes a request and waits for its ``.complete`` reply; a ``.failed`` reply raises its error."""
        env = build_request(topic, payload, self._conn.inbox, correlation_id, headers, None)
        waiter = self._conn.await_reply(env.id, topic, env.correlation_id)
        try:
            self._conn.submit_publish(encode_envelope(env), timeout).result(timeout)
            reply = waiter.result(timeout)
        except TimeoutError:
            raise TimeoutError(f"no reply to {topic!r} within {timeout} s", topic=topic, timeout=timeout,
                               correlation_id=env.correlation_id) from None
        finally:
            self._conn.forget_reply(env.id)
        return reply_message(reply)

    def reply_nowait(self, request: Message, payload: Any = None, *, error: BusError | None = None,
                     timeout: float = 10.0) -> Pending:
        """Answers ``request`` (a message on ``<...>.request`` that has a reply_to): its ``.complete`` carrying
        ``payload``, or with ``error`` its ``.failed``, which the requester's ``request()`` raises as that typed
        error. ``.result()`` of what it returns is the reply's seq, once logged."""
        env = request.envelope
        if not env.reply_to:
            raise ValidationError(f"message {env.id} on {env.topic!r} asks for no reply (it has no reply_to)",
                                  topic=env.topic, field="reply_to")
        complete, failed = reply_topics(env.topic)
        topic, body = ((failed, encode_payload(failed, error.to_wire())) if error is not None
                       else (complete, encode_payload(complete, payload)))
        _, data = encode_new(topic, body, correlation_id=env.correlation_id, causation_id=env.id,
                             recipient=env.reply_to)
        return self._conn.submit_publish(data, timeout)

    def reply(self, request: Message, payload: Any = None, *, error: BusError | None = None,
              timeout: float = 10.0) -> int:
        """``reply_nowait``, waiting until the reply is logged; returns its seq."""
        return int(self.reply_nowait(request, payload, error=error, timeout=timeout).result(timeout))

    # -- subscriptions, replay, groups, status ---------------------------------------------------
    # -- subscriptions, replay, groups, status ---------------------------------------------------

    def subscribe(self, *patterns: str, from_seq: int | None = None, max_queued: int = 10_000) -> Subscription:
        """Follows live messages matching ``patterns`` (``*`` one segment, ``>`` the rest), in log order,
        each exactly once; with ``from_seq``, first everything logged since then."""
        if not patterns:
            raise ValidationError("subscribe needs at least one pattern (\">\" for every topic)", field="patterns")
        return Subscription(self._conn, [check_pattern(p) for p in patterns], from_seq, max_queued)

    def replay(self, *, topic: str | None = None, from_seq: int = 1, to_seq: int | None = None,
               since: float | None = None, until: float | None = None, correlation_id: str | None = None,
               timeout: float = 10.0) -> Iterator[Message]:
        """Streams logged messages by seq range, time range (unix seconds), topic pattern, correlation id."""
        body = replay_body(topic=topic, from_seq=from_seq, to_seq=to_seq, since=since, until=until,
                           correlation_id=correlation_id)
        page = self._replay_page(body)
        while True:
            next_seq, done, envs = decode_replayed(page.result(timeout))
            if not done:  # ask for the next page now: the broker reads it while the caller consumes this one
                body["from_seq"] = next_seq
                body["since_ns"] = None
                page = self._replay_page(body)
            for env in envs:
                yield Message(env)
            if done:
                return

    def _replay_page(self, body: dict[str, Any]) -> Pending:
        packed = P.pack(body)
        return self._conn.request(lambda rid: [P.REPLAY, P.pack_id(rid), packed])

    def status(self, *, timeout: float = 5.0) -> dict[str, Any]:
        raw = self._conn.request(lambda rid: [P.STATUS, P.pack_id(rid)]).result(timeout)
        result: dict[str, Any] = P.unpack(raw)
        return result

    def consume(self, group: str, patterns: list[str] | tuple[str, ...] = (), *, credit: int = 500,
                ack_timeout: float | None = None, max_attempts: int | None = None,
                from_seq: int | None = None, position: int | None = None) -> Consumer:
        """Joins a durable consumer group: every matching message, at least once, in log order.

        A new group starts at the beginning of the log, or at ``from_seq``; an existing one where its members
        left it. ``position`` is for a member that keeps its own log position in its store (a store worker):
        the next seq it needs. The group is moved there (back, for a store that lost or wiped its latest
        writes), and a member of the same module left by an earlier run of it is replaced: one such member
        per group."""
        return Consumer(self._conn, group, [check_pattern(p) for p in patterns], credit, ack_timeout,
                        max_attempts, from_seq, position)

    @property
    def head(self) -> int:
        return self._conn.head


def _until_ended(take: Callable[[], Iterable[T]], ended: Callable[[], bool]) -> Iterator[T]:
    """What ``take`` returns, again and again, until ``ended``: a ConnectionError then is the end, not a failure."""
    while not ended():
        try:
            yield from take()
        except ConnectionError:
            if ended():
                return
            raise


class Subscription:
    """An iterator over live messages; a context manager that unsubscribes on exit."""

    def __init__(self, conn: Connection, patterns: list[str], from_seq: int | None, max_queued: int) -> None:
        if max_queued < 1:
            raise ValidationError(f"max_queued is {max_queued}: a subscription must hold at least one message",
                                  field="max_queued", expected=">= 1")
        self._conn = conn
        self._queue: collections.deque[Envelope] = collections.deque()
        self._cond = threading.Condition()
        self._max = max_queued
        self._waiting_room = False
        self.sub_id = next(_sub_ids)
        self._state = LiveState(self.sub_id, patterns, self._deliver, self._room, start=from_seq)
        self._closed = False
        self.waker: Callable[[], None] | None = None
        """Called (on the I/O thread) when messages arrive: how the asyncio twin waits without polling."""
        conn.add_sub(self._state)

    def _room(self) -> bool:
        room = len(self._queue) < self._max
        if not room:
            self._waiting_room = True
        return room

    def _deliver(self, envs: list[Envelope]) -> None:
        with self._cond:
            self._queue.extend(envs)
            self._cond.notify_all()
        if self.waker is not None:
            self.waker()

    def get(self, timeout: float | None = None) -> Message:
        """The next message; raises TimeoutError when none arrives in time."""
        deadline = None if timeout is None else time.monotonic() + seconds(timeout)
        with self._cond:
            while not self._queue:
                if self._closed:
                    raise ConnectionError("subscription closed")
                if self._state.error is not None:
                    raise self._state.error
                self._conn.check_usable()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no message within {timeout} s", timeout=timeout)
                self._cond.wait(0.1 if left is None else min(left, 0.1))
            env = self._queue.popleft()
            resume = self._waiting_room and len(self._queue) < self._max // 2
        if resume:
            self._waiting_room = False
            self._conn.resume_sub(self.sub_id)
        return Message(env)

    def __iter__(self) -> Iterator[Message]:
        """Every message, until the subscription or its bus is closed (a failure raises)."""
        return _until_ended(lambda: (self.get(),), lambda: self.ended)

    @property
    def ended(self) -> bool:
        """Closed by its owner, or its bus closed: the end of the stream, not a failure."""
        return self._closed or self._conn.closed

    @property
    def last_seq(self) -> int:
        return self._state.last

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.remove_sub(self.sub_id)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _check_join(ack_timeout: float | None, max_attempts: int | None, from_seq: int | None,
                position: int | None) -> None:
    """What the broker would refuse at the first fetch (as a malformed JOIN), refused here by name."""
    try:
        P.join_body.decode(P.pack({k: v for k, v in (("ack_timeout", ack_timeout), ("max_attempts", max_attempts),
                                                      ("from_seq", from_seq), ("position", position))
                                   if v is not None}))
    except msgspec.ValidationError as exc:
        field = str(exc).rpartition("`$.")[2].rstrip("`") or "consume"
        raise ValidationError(f"consume: {exc}", field=field) from None


class Consumer:
    """A member of a durable consumer group, with credit-based flow control and explicit acks."""

    def __init__(self, conn: Connection, group: str, patterns: list[str], credit: int,
                 ack_timeout: float | None, max_attempts: int | None, from_seq: int | None,
                 position: int | None = None) -> None:
        try:
            P.check_group_name(group)
        except ValueError as exc:
            raise ValidationError(str(exc), field="group", expected="1 to 128 bytes of printable text") from None
        if not 1 <= credit <= P.MAX_CREDIT:
            raise ValidationError(f"credit is {credit}: a member holds 1 to {P.MAX_CREDIT} messages", field="credit",
                                  expected=f"1..{P.MAX_CREDIT}")
        _check_join(ack_timeout, max_attempts, from_seq, position)
        self._conn = conn
        self.group = group
        self._queue: collections.deque[tuple[int, Envelope]] = collections.deque()
        self._cond = threading.Condition()
        body: dict[str, Any] = {"patterns": patterns, "credit": credit}
        if ack_timeout:
            body["ack_timeout"] = ack_timeout
        if max_attempts:
            body["max_attempts"] = max_attempts
        if from_seq:
            body["from_seq"] = from_seq
        if position:
            body["position"] = position
        self._closed = False
        self.waker: Callable[[], None] | None = None
        """Called (on the I/O thread) when deliveries arrive: how the asyncio twin waits without polling."""
        self._held: set[int] = set()
        """Seqs handed to this member and not yet acked (nor dead-lettered by a nack): a rejoin with a ``position``
        resumes at the lowest, so nothing nacked or still being worked on is skipped."""
        self._top = 0
        """The highest seq settled: with nothing held, a rejoin resumes after it."""
        self._state = GroupState(group, body, self._deliver)
        conn.join_group(self._state)

    def _deliver(self, items: list[tuple[int, Envelope]]) -> None:
        with self._cond:
            if "position" in self._state.body:
                self._held.update(env.seq for _, env in items)
            self._queue.extend(items)
            self._cond.notify_all()
        if self.waker is not None:
            self.waker()

    def fetch(self, max_messages: int = 500, *, timeout: float | None = 1.0) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``timeout`` for the first; [] if none (ConnectionError
        once the consumer or its bus is closed)."""
        deadline = None if timeout is None else time.monotonic() + seconds(timeout)
        with self._cond:
            while not self._queue:
                if self._closed:
                    raise ConnectionError(f"consumer of group {self.group!r} closed", group=self.group)
                self._conn.check_usable()
                if self._state.error is not None:
                    raise self._state.error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._cond.wait(0.1 if left is None else min(left, 0.1))
            out: list[Delivery] = []
            while self._queue and len(out) < max_messages:
                attempt, env = self._queue.popleft()
                out.append(Delivery(Message(env), attempt))
        return out

    def __iter__(self) -> Iterator[Delivery]:
        """Every delivery, until the consumer or its bus is closed (a failure raises)."""
        return _until_ended(lambda: self.fetch(timeout=None), lambda: self.ended)

    @property
    def ended(self) -> bool:
        """Closed by its owner, or its bus closed."""
        return self._closed or self._conn.closed

    def ack(self, deliveries: list[Delivery] | list[int]) -> None:
        seqs = [d if isinstance(d, int) else d.seq for d in deliveries]
        if seqs:
            self._conn.ack(self.group, seqs)
            self._settled(seqs)

    def _settled(self, seqs: list[int]) -> None:
        """A rejoin after a broker restart resumes at the first message not yet settled."""
        if "position" not in self._state.body:
            return
        with self._cond:
            self._held.difference_update(seqs)
            body = self._state.body
            self._top = max(self._top, *seqs)
            body["position"] = min(self._held) if self._held else max(int(body["position"]), self._top + 1)

    def nack(self, deliveries: list[Delivery] | list[int], reason: str, *, delay: float = 0.0) -> None:
        """Hands messages back for redelivery after ``delay`` s; dead-lettered after the group's max attempts."""
        items = [(d if isinstance(d, int) else d.seq, reason, delay) for d in deliveries]
        if items:
            self._conn.nack(self.group, items)
            # dead-lettered on its last attempt: settled, or a rejoin at ``position`` would bring it back
            last = self._state.body.get("max_attempts") or (self._conn.welcome or {}).get("max_attempts")
            dead = [d.seq for d in deliveries if not isinstance(d, int) and last and d.attempt >= int(last)]
            if dead:
                self._settled(dead)

    def touch(self) -> None:
        """Tells the broker this member is still working on every message it was handed (fetched or not): each
        gets a new ack timeout, and no delivery attempt is counted. Call it while waiting on something slow
        (a full disk) for longer than the ack timeout, so the messages are not redelivered or dead-lettered."""
        self._conn.touch(self.group)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.leave_group(self.group)

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
