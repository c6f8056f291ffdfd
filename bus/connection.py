"""The client's connection: one I/O thread that owns the DEALER socket.

Callers on any thread (or an asyncio loop) hand it work through a queue. It
coalesces every publish that is waiting into one PUB frame while earlier
batches are in flight (no added linger when idle), resends unacknowledged
batches with the same message ids (the broker stores each once), keeps
heartbeats both ways, re-establishes subscriptions and group memberships after
the broker restarts, and fills live-subscription gaps from the log.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
import zmq
from zmq.utils.monitor import parse_monitor_message

from bus import protocol as P
from contracts.envelope import DECODE_ERRORS, Envelope, array_header
from contracts.errors import (
    BusError,
    ConnectionError,
    MessageTooLarge,
    NotAuthorized,
    TimeoutError,
    ValidationError,
    error_from_wire,
)
from contracts.ids import new_id
from contracts.topics import reply_topics

log = structlog.get_logger("membus.client")

MAX_BATCH = 1024
MAX_BATCH_BYTES = 1 << 20
MAX_INFLIGHT_BATCHES = 4
MAX_OUTSTANDING = 1 << 18
"""Publishes not yet answered (queued or in flight) a connection holds before a publish call waits for room:
memory stays bounded when the broker takes messages slower than they come, or is gone (~100 MB of 256-byte
messages)."""
RESEND_AFTER_S = 3.0

_live_decoder = msgspec.msgpack.Decoder(tuple[int, int, list[Envelope]])
_deliver_decoder = msgspec.msgpack.Decoder(list[tuple[int, Envelope]])
_envs_decoder = msgspec.msgpack.Decoder(list[Envelope])
_replayed_decoder = msgspec.msgpack.Decoder(tuple[int, bool, list[Envelope]])



def seconds(timeout: float) -> float:
    """``timeout`` if it is a number of seconds >= 0: a NaN deadline never passes, and breaks the order of the
    heaps of deadlines it joins."""
    if not 0 <= timeout < 1e9:  # NaN and infinity too (a condition cannot wait that long)
        raise ValidationError(f"a timeout is a finite number of seconds >= 0, not {timeout!r}", field="timeout",
                              expected="seconds >= 0, finite")
    return timeout


class Pending:
    """A result that another thread waits for: a publish ack, a replay page, a reply.

    Lighter than concurrent.futures.Future: every waiter shares the connection's condition.
    """

    __slots__ = ("_callbacks", "_cond", "done", "error", "value")

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self._callbacks: list[Callable[[Pending], None]] | None = None

    def _settle(self) -> None:
        # called on the I/O thread with the condition held: a callback that raises must not end that thread
        self.done = True
        if self._callbacks:
            for cb in self._callbacks:
                try:
                    cb(self)
                except Exception as exc:
                    log.exception("client.callback_failed", callback=getattr(cb, "__qualname__", repr(cb)),
                                  error=repr(exc))

    def add_done_callback(self, cb: Callable[[Pending], None]) -> None:
        with self._cond:
            if not self.done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(cb)
                return
        cb(self)

    def result(self, timeout: float | None = None) -> Any:
        if timeout is not None:
            seconds(timeout)
        if not self.done:
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._cond:
                while not self.done:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"no answer within {timeout} s", timeout=timeout)
                    self._cond.wait(left)
        if self.error is not None:
            raise self.error
        return self.value


class _ReplyWaiter(Pending):
    """The waiter of a request's reply, with the topics that may answer it."""

    __slots__ = ("correlation_id", "topics")

    def __init__(self, cond: threading.Condition, topics: tuple[str, str], correlation_id: str) -> None:
        super().__init__(cond)
        self.topics = topics
        self.correlation_id = correlation_id


class _PubItem(Pending):
    """A queued publish is its own Pending: one object per message, or per chunk of ``publish_many``.

    ``count`` is 0 for one message, which settles with its seq; a chunk of ``count`` envelopes settles with
    a list holding each one's seq or the error it was refused with.
    """

    __slots__ = ("count", "data", "deadline")

    def __init__(self, cond: threading.Condition, data: bytes, deadline: float, count: int = 0) -> None:
        # Pending.__init__ inlined: one of these is made per published message
        self._cond = cond
        self.done = False
        self.value = None
        self.error = None
        self._callbacks = None
        self.data = data
        self.deadline = deadline
        self.count = count


class Gathered(Pending):
    """One Pending for the chunks of a ``publish_many``: its value is every message's seq, in order.

    If the broker refused some of the messages, it fails with the first refusal's error; that error's
    ``fields`` hold ``index`` (the message's place) and ``seqs`` (each message's seq, None if refused).
    """

    __slots__ = ("_left", "_parts")

    def __init__(self, cond: threading.Condition, parts: list[_PubItem]) -> None:
        super().__init__(cond)
        self._parts = parts
        self._left = len(parts)
        if not parts:
            self.value = []
            self.done = True
        for part in parts:
            part.add_done_callback(self._part_done)

    def _part_done(self, _part: Pending) -> None:
        # on the I/O thread with the condition held, or in add_done_callback for a settled part
        self._left -= 1
        if self._left:
            return
        failed = next((p.error for p in self._parts if p.error is not None), None)
        if failed is not None:
            self.error = failed
        else:
            results: list[int | BusError] = [r for p in self._parts for r in p.value]
            seqs = [r if r.__class__ is int else None for r in results]
            refused = next((i for i, r in enumerate(results) if r.__class__ is not int), None)
            if refused is None:
                self.value = seqs
            else:
                error = results[refused]
                assert isinstance(error, BusError)
                error.fields.update(index=refused, seqs=seqs)
                self.error = error
        self._settle()


@dataclass
class _Batch:
    items: list[_PubItem]
    frame: bytes
    sent_at: float
    count: int
    """Envelopes in the frame (more than ``len(items)`` when it holds chunks of publish_many)."""


@dataclass
class LiveState:
    sub_id: int
    patterns: list[str]
    deliver: Callable[[list[Envelope]], None]
    room: Callable[[], bool]
    last: int = -1
    """Every matching message up to ``last`` has been delivered (-1: not yet confirmed)."""
    start: int | None = None
    target: int = 0
    catching_up: bool = False
    replay_in_flight: bool = False
    error: BusError | None = None


@dataclass
class GroupState:
    name: str
    body: dict[str, Any]
    deliver: Callable[[list[tuple[int, Envelope]]], None]
    error: BusError | None = None


@dataclass
class _Counters:
    published: int = 0
    resent: int = 0
    gaps_filled: int = 0
    reconnects: int = 0
    foreign_replies: int = 0
    """Messages in this client's inbox that answer a request but are not its reply topics (ignored)."""
    dropped_sends: int = 0
    """Commands not sent for want of a connection: publishes, requests, joins and subscriptions are sent again
    on WELCOME; an ack dropped so is a redelivery."""
    errors: dict[str, int] = field(default_factory=dict)


class Connection(threading.Thread):
    def __init__(self, *, endpoint: str, server_key: bytes, public_key: bytes, secret_key: bytes,
                 name: str, resolve_endpoint: Callable[[], str | None] | None = None,
                 heartbeat_s: float = 1.0, max_outstanding: int = MAX_OUTSTANDING) -> None:
        super().__init__(name=f"membus-io-{name}", daemon=True)
        self.endpoint = endpoint
        self._resolve_endpoint = resolve_endpoint
        self.server_key, self.public_key, self.secret_key = server_key, public_key, secret_key
        self.client_name = name
        self.inbox = f"inbox.{name}.{new_id().lower()}"
        """Named after the module: the broker gives a client only an inbox of its own module."""
        self.heartbeat_s = heartbeat_s
        self.cond = threading.Condition()
        self._ops: collections.deque[Callable[[], object]] = collections.deque()
        self._pubq: collections.deque[_PubItem] = collections.deque()
        self.max_outstanding = max_outstanding
        self._submitted = 0
        """Messages handed to publish (by the publishing threads; a lost update between two of them only loosens
        the bound)."""
        self._answered = 0
        """Messages whose publish settled (by the I/O thread): ``_submitted - _answered`` are outstanding."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._closing = False
        self._batches: dict[int, _Batch] = {}
        self._next_id = 1
        self._requests: dict[int, tuple[Pending, list[bytes]]] = {}
        """REPLAY and STATUS requests waiting for their answer, with their frames: both only read, so they are sent
        again to a broker that restarted before answering (a subscription's catch-up page included)."""
        self._waiters: dict[str, _ReplyWaiter] = {}
        self._reply_deadlines: list[tuple[float, str, float]] = []
        """Heap of (deadline, request id, timeout) of the waiters that fail by themselves when no reply came."""
        self.subs: dict[int, LiveState] = {}
        self.groups: dict[str, GroupState] = {}
        self.welcome: dict[str, Any] | None = None
        self._frame_limit = P.max_frame(0)
        """The largest PUB frame the broker takes (known from WELCOME)."""
        self.fatal: BusError | None = None
        self.failed_handshakes = 0
        """Handshakes the broker ended since the last one that succeeded: a server key that is not the broker's."""
        self.connected = threading.Event()
        self.head = 0
        self.ordered_ids_from: int | None = None
        """The broker's (WELCOME): kept while it is silent, unlike ``welcome``."""
        self.counters = _Counters()
        self._last_heard = 0.0
        self._last_ping = 0.0
        self._last_hello = 0.0
        self._hello_backoff = 0.1
        self._hello_sent = -1.0
        """When a HELLO last went out on a connection (not dropped for want of one)."""
        self._greeted = False
        """Whether a broker has welcomed this client before: every later WELCOME is a reconnect (``welcome`` is
        cleared while the broker is silent, so it cannot say)."""

    # -- called from any thread ------------------------------------------------------------------

    def call(self, op: Callable[[], object]) -> None:
        """Runs ``op`` on the I/O thread."""
        self._ops.append(op)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def _wake(self) -> None:
        # _wake_pending is cleared by the I/O thread just before it sleeps: while it is busy (or a PUBACK
        # will wake it anyway), publishers append without a system call.
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"x")

    def submit_publish(self, data: bytes, timeout: float) -> Pending:
        self.check_usable()
        seconds(timeout)
        if self._submitted - self._answered >= self.max_outstanding:
            self._wait_for_room(1, timeout)
        self._submitted += 1
        item = _PubItem(self.cond, data, time.monotonic() + timeout)
        self._pubq.append(item)
        self._wake()
        return item

    def submit_publish_many(self, chunks: list[tuple[bytes, int]], timeout: float) -> Gathered:
        """Queues chunks of envelopes, each (concatenated envelopes, how many), as one publish."""
        self.check_usable()
        seconds(timeout)
        total = sum(count for _, count in chunks)
        if self._submitted - self._answered + total > self.max_outstanding:
            self._wait_for_room(total, timeout)
        self._submitted += total
        deadline = time.monotonic() + timeout
        parts = [_PubItem(self.cond, data, deadline, count) for data, count in chunks]
        gathered = Gathered(self.cond, parts)
        self._pubq.extend(parts)
        self._wake()
        return gathered

    def _wait_for_room(self, adding: int, timeout: float) -> None:
        """Backpressure: waits until ``adding`` more messages fit under ``max_outstanding`` (a call larger than the
        bound waits until nothing else is outstanding)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self._submitted - self._answered > max(0, self.max_outstanding - adding):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._submitted - self._answered} publishes are still unanswered (at most "
                                       f"{self.max_outstanding}): the broker takes them slower than they come, or "
                                       f"cannot be reached", timeout=timeout, outstanding=self.max_outstanding)
                self.cond.wait(left)
                self.check_usable()

    def request(self, build: Callable[[int], list[bytes]]) -> Pending:
        """Sends the frames ``build(request_id)`` returns and waits for the answer with that id."""
        self.check_usable()
        pending = Pending(self.cond)

        def op() -> None:
            rid = self._new_id()
            frames = build(rid)
            self._requests[rid] = (pending, frames)
            self._send(frames)

        self.call(op)
        return pending

    def await_reply(self, request_id: str, topic: str, correlation_id: str, timeout: float | None = None) -> Pending:
        """A waiter for the reply to ``request_id``, a request on ``topic``: only its ``.complete`` or ``.failed``
        is taken (whoever else may address this inbox). With ``timeout``, it fails with TimeoutError by itself
        once that has passed without a reply (and is forgotten), so its callbacks run and nothing is kept.
        After a reconnect, the broker is asked for a reply logged while this client was away (by
        ``correlation_id``, the request's trace)."""
        if timeout is not None:
            seconds(timeout)
        pending = _ReplyWaiter(self.cond, reply_topics(topic), correlation_id)
        with self.cond:
            self._waiters[request_id] = pending
            if timeout is not None:
                deadlines = self._reply_deadlines
                if len(deadlines) > 2 * len(self._waiters) + 1024:  # mostly answered already: only those left
                    deadlines[:] = [d for d in deadlines if d[1] in self._waiters]
                    heapq.heapify(deadlines)
                heapq.heappush(deadlines, (time.monotonic() + timeout, request_id, timeout))
        return pending

    def reply_refused(self, request_id: str, sent: Pending) -> None:
        """Once a request's publish settled: if the broker refused it, no reply will come, and the reply's waiter
        fails now with the refusal instead of waiting out its timeout."""
        if sent.error is None:
            return
        with self.cond:
            waiter = self._waiters.pop(request_id, None)
            if waiter is not None and not waiter.done:
                waiter.error = sent.error
                waiter._settle()
                self.cond.notify_all()

    def forget_reply(self, request_id: str) -> None:
        with self.cond:
            self._waiters.pop(request_id, None)

    def close(self, timeout: float = 2.0) -> None:
        self._closing = True
        self.call(lambda: None)
        self.join(timeout)

    @property
    def closed(self) -> bool:
        """Closed by its owner (not refused, not failed)."""
        return self._closing and self.fatal is None

    def check_usable(self) -> None:
        """Raises why this connection can no longer be used: refused, closed, or its I/O thread failed."""
        if self.fatal is not None:
            raise self.fatal
        if self._closing:
            raise ConnectionError("the bus connection is closed")

    # -- the I/O thread --------------------------------------------------------------------------

    def run(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context.instance()
        self.sock = self._make_socket(ctx)
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._hello()
        try:
            while not self._closing:
                events = dict(poller.poll(self._sleep_ms()))
                if self._wake_r.fileno() in events:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                if monitor in events:
                    self._on_monitor(monitor)
                if self.sock in events:
                    self._drain()
                while self._ops:
                    self._ops.popleft()()
                self._flush_publishes()
                self._timers()
        except Exception as exc:  # the thread must report, not vanish: every later call fails at once
            log.exception("client.io_failed", error=repr(exc))
            self.fatal = ConnectionError(f"the client's I/O thread failed: {exc!r}")
            self._fail_all(self.fatal)
        finally:
            if not self._closing:
                self._fail_all(ConnectionError("the bus connection is closed"))
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart([P.BYE], zmq.NOBLOCK)
            self.sock.disable_monitor()
            monitor.close(linger=0)
            self.sock.close(linger=0)
            self._wake_r.close()
            self._wake_w.close()
            self._fail_all(ConnectionError("the bus connection is closed"))

    def _sleep_ms(self) -> int:
        """How long the next poll may block: 0 if work arrived meanwhile (clear the flag first, then look)."""
        self._wake_pending = False
        if self._ops:
            return 0
        if self._pubq:
            if len(self._batches) < MAX_INFLIGHT_BATCHES and self.welcome is not None:
                return 0
            self._wake_pending = True  # blocked on batches in flight: their PUBACK wakes this thread
        return 100

    def _make_socket(self, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
        sock = ctx.socket(zmq.DEALER)
        sock.curve_serverkey = self.server_key
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key
        sock.routing_id = os.urandom(12)
        sock.linger = 0
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        # nothing is queued for a broker that is not there: what needs it again is sent again on WELCOME, and
        # HELLOs queued through an outage each made the broker drop and greet this client once more
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(self.endpoint)
        return sock  # type: ignore[no-any-return]

    def _send(self, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:  # no connection to the broker (every broker restart): what matters is sent again
            self.counters.dropped_sends += 1
            log.debug("client.send_dropped", command=frames[0].decode())
            return False

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _hello(self) -> None:
        self._last_hello = time.monotonic()
        if self._send([P.HELLO, P.pack({"client": self.client_name, "inbox": self.inbox,
                                        "proto": P.PROTOCOL_VERSION})]):
            self._hello_sent = self._last_hello

    def _on_monitor(self, monitor: zmq.Socket[Any]) -> None:
        try:
            while True:
                evt = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
                if evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    err = NotAuthorized(
                        f"the broker at {self.endpoint} refused this client's key (module {self.client_name!r} "
                        "is not on its allow-list)", endpoint=self.endpoint, module=self.client_name)
                    log.error("client.not_authorized", endpoint=self.endpoint)
                    self.fatal = err
                    self._fail_all(err)
                    self._closing = True
                elif evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                    log.warning("client.handshake_failed", endpoint=self.endpoint)
                elif evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    self.failed_handshakes += 1
                elif evt["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.failed_handshakes = 0
                    if time.monotonic() - self._hello_sent > 0.5:  # else this connection already has it
                        self._hello()  # a new connection (a restarted broker): greet it now
        except zmq.Again:
            pass

    def _fail_all(self, err: BusError) -> None:
        publishes: list[_PubItem] = []
        while self._pubq:  # one at a time: a publish queued meanwhile by another thread is failed too, not lost
            publishes.append(self._pubq.popleft())
        for b in self._batches.values():
            publishes.extend(b.items)
        self._batches.clear()
        self._refuse(publishes, err)
        with self.cond:
            others = [p for p, _ in self._requests.values()] + list(self._waiters.values())
            self._requests.clear()
            self._waiters.clear()
            for p in others:
                if not p.done:
                    p.error = err
                    p._settle()
            self.cond.notify_all()

    # -- publishing ------------------------------------------------------------------------------

    def _flush_publishes(self) -> None:
        while self._pubq and len(self._batches) < MAX_INFLIGHT_BATCHES and self.welcome is not None:
            items: list[_PubItem] = []
            size = count = 0
            q = self._pubq
            while q and count < MAX_BATCH and size < MAX_BATCH_BYTES:
                item = q.popleft()
                items.append(item)
                size += len(item.data)
                count += item.count or 1
            if size > self._frame_limit:  # only the last one can have made it so (the frame had < 1 MiB before)
                last = items.pop()
                size -= len(last.data)
                count -= last.count or 1
                if len(last.data) > self._frame_limit:
                    self._refuse([last], MessageTooLarge(f"a publish of {len(last.data)} bytes exceeds the "
                                                         f"broker's frame limit of {self._frame_limit}",
                                                         limit=self._frame_limit))
                else:
                    q.appendleft(last)  # in a frame of its own, so a refusal of that frame is its own
            if not items:
                continue
            frame = array_header(count) + b"".join([i.data for i in items])
            bid = self._new_id()
            self._batches[bid] = _Batch(items, frame, time.monotonic(), count)
            self._send([P.PUB, P.pack_id(bid), frame])

    def _refuse(self, items: list[_PubItem], err: BusError) -> None:
        """Publishes refused whole: each answered with ``err``, and no longer counted as outstanding."""
        with self.cond:
            for item in items:
                if not item.done:
                    self._answered += item.count or 1
                    item.error = err
                    item._settle()
            self.cond.notify_all()

    def _on_puback(self, bid: int, results: list[Any]) -> None:
        batch = self._batches.pop(bid, None)
        if batch is None:
            return  # an answer to a resend we already had
        if len(results) < batch.count:  # a broker bug, not a reason to lose track of the rest
            results = results + [["protocol", "no result for this message"]] * (batch.count - len(results))
        with self.cond:
            i = 0
            for item in batch.items:
                if not item.done:
                    self._answered += item.count or 1
                if item.count:  # a publish_many chunk: every message's seq or error
                    item.value = [r if r.__class__ is int else error_from_wire({"code": r[0], "message": r[1]})
                                  for r in results[i:i + item.count]]
                    i += item.count
                else:
                    r = results[i]
                    i += 1
                    if r.__class__ is int:
                        item.value = r
                    else:
                        item.error = error_from_wire({"code": r[0], "message": r[1]})
                item.done = True
                if item._callbacks:
                    item._settle()
            self.cond.notify_all()
        self.counters.published += batch.count

    # -- receiving -------------------------------------------------------------------------------

    def _drain(self) -> None:
        for _ in range(1000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            try:
                self._dispatch(frames)
            except (*DECODE_ERRORS, ValueError, IndexError) as exc:
                log.warning("client.bad_frame", error=str(exc))

    def _dispatch(self, frames: list[bytes]) -> None:
        cmd = frames[0]
        if cmd == P.PUBACK:
            self._on_puback(P.unpack_id(frames[1]), P.unpack(frames[2]))
        elif cmd == P.DELIVER:
            group = self.groups.get(frames[1].decode())
            if group is not None:
                group.deliver(_deliver_decoder.decode(frames[2]))
        elif cmd == P.LIVE:
            sub = self.subs.get(P.unpack_id(frames[1]))
            if sub is not None:
                first, last, envs = _live_decoder.decode(frames[2])
                self._on_live(sub, first, last, envs)
        elif cmd == P.INBOX:
            self._on_inbox(_envs_decoder.decode(frames[1]))
        elif cmd == P.PONG:
            self.head = P.unpack_id(frames[1])
        elif cmd == P.REPLAYED or cmd == P.STATUSR:
            self._settle_request(P.unpack_id(frames[1]), frames[2], error=None)
        elif cmd == P.WELCOME:
            self._on_welcome(P.unpack(frames[1]))
        elif cmd == P.ERROR:
            self._on_error(frames[1], P.unpack(frames[2]))

    def _settle_request(self, rid: int, value: Any, error: BusError | None) -> None:
        entry = self._requests.pop(rid, None)
        if entry is None:
            return
        pending = entry[0]
        with self.cond:
            pending.value, pending.error = value, error
            pending._settle()
            self.cond.notify_all()

    def _on_welcome(self, body: dict[str, Any]) -> None:
        first = not self._greeted
        self._greeted = True
        self.welcome = body
        self._frame_limit = P.max_frame(int(body.get("max_message", 0)))
        self.head = int(body.get("head", 0))
        cutover = body.get("ordered_ids_from")
        self.ordered_ids_from = int(cutover) if cutover is not None else None
        self._hello_backoff = 0.1
        if not first:
            self.counters.reconnects += 1
            log.info("client.reconnected", broker=body.get("broker"))
        for group in self.groups.values():
            self._send([P.JOIN, group.name.encode(), P.pack(group.body)])
        for sub in self.subs.values():
            self._send([P.SUB, P.pack_id(sub.sub_id), P.pack({"patterns": sub.patterns})])
        now = time.monotonic()
        for bid, batch in list(self._batches.items()):
            batch.sent_at = now
            self._send([P.PUB, P.pack_id(bid), batch.frame])
        if not first:
            for _, frames in self._requests.values():
                self._send(frames)
            self._ask_missed_replies()
        self.connected.set()

    def _ask_missed_replies(self) -> None:
        """A reply logged while this client was away was sent to no one (the broker that logged it did not know
        its inbox): the broker looks each awaited one up in the log. The PUB frames resent just before are read
        first, so a request that was logged before the break but never acked is looked up too."""
        with self.cond:
            asked = [(rid, w.correlation_id) for rid, w in self._waiters.items()]
        for start in range(0, len(asked), P.MAX_REPLIES_ASKED):
            self._send([P.REPLIES, P.pack(asked[start:start + P.MAX_REPLIES_ASKED])])

    def _on_error(self, ref: bytes, body: dict[str, Any]) -> None:
        err = error_from_wire(body)
        code = str(body.get("code"))
        self.counters.errors[code] = self.counters.errors.get(code, 0) + 1
        if code == "unknown_client":
            if time.monotonic() - self._last_hello > 0.2:
                self._hello()
            return  # pending batches are resent on WELCOME
        if not ref and code == "not_authorized":  # the broker refused this client itself (its HELLO)
            log.error("client.refused", error=err.message)
            self.fatal = err
            self._fail_all(err)
            self._closing = True
            return
        if len(ref) == 8:
            rid = P.unpack_id(ref)
            batch = self._batches.pop(rid, None)
            if batch is not None:
                self._refuse(batch.items, err)
                return
            if rid in self._requests:
                self._settle_request(rid, None, err)
                return
            if rid in self.subs:
                self.subs[rid].error = err
                return
        group = self.groups.get(ref.decode(errors="replace"))
        if group is not None:
            group.error = err
            return
        log.warning("client.broker_error", code=code, error=err.message)

    def _on_inbox(self, envs: list[Envelope]) -> None:
        with self.cond:
            for env in envs:
                pending = self._waiters.get(env.causation_id)
                if pending is None:
                    continue
                if env.topic not in pending.topics:  # another module's answer to our request: not the reply
                    self.counters.foreign_replies += 1
                    log.warning("client.foreign_reply", topic=env.topic, source=env.source,
                                correlation_id=env.correlation_id)
                    continue
                del self._waiters[env.causation_id]
                pending.value = env
                pending._settle()
            self.cond.notify_all()

    # -- live subscriptions with gap fill --------------------------------------------------------

    def add_sub(self, sub: LiveState) -> None:
        def op() -> None:
            self.subs[sub.sub_id] = sub
            self._send([P.SUB, P.pack_id(sub.sub_id), P.pack({"patterns": sub.patterns})])
        self.call(op)

    def remove_sub(self, sub_id: int) -> None:
        def op() -> None:
            if self.subs.pop(sub_id, None) is not None:
                self._send([P.UNSUB, P.pack_id(sub_id)])
        self.call(op)

    def resume_sub(self, sub_id: int) -> None:
        """The subscriber made room: continue catching up from the log."""
        def op() -> None:
            sub = self.subs.get(sub_id)
            if sub is not None and sub.catching_up:
                self._catch_up(sub)
        self.call(op)

    def _on_live(self, sub: LiveState, first: int, last: int, envs: list[Envelope]) -> None:
        if sub.last < 0:
            sub.last = (sub.start - 1) if sub.start is not None else first - 1
        if sub.catching_up or first > sub.last + 1 or not sub.room():
            sub.target = max(sub.target, last)
            if not sub.catching_up:
                sub.catching_up = True
                self.counters.gaps_filled += 1
                log.debug("subscription.gap", sub=sub.sub_id, after=sub.last, first=first)
            self._catch_up(sub)
            return
        fresh = [e for e in envs if e.seq > sub.last]
        if fresh:
            sub.deliver(fresh)
        sub.last = max(sub.last, last)

    def _catch_up(self, sub: LiveState) -> None:
        if sub.replay_in_flight or not sub.room():
            return
        if sub.last >= sub.target:
            sub.catching_up = False
            return
        sub.replay_in_flight = True
        rid = self._new_id()
        pending = Pending(self.cond)
        frm, to = sub.last + 1, sub.target

        def on_page(p: Pending) -> None:
            sub.replay_in_flight = False
            if p.error is not None or self.subs.get(sub.sub_id) is not sub:
                return
            next_seq, _done, envs = _replayed_decoder.decode(p.value)
            fresh = [e for e in envs if e.seq > sub.last]
            if fresh:
                sub.deliver(fresh)
            sub.last = max(sub.last, min(next_seq - 1, to))
            self._catch_up(sub)

        pending._callbacks = [on_page]
        frames = [P.REPLAY, P.pack_id(rid), P.pack({"from_seq": frm, "to_seq": to, "patterns": sub.patterns,
                                                    "limit": 1000})]
        self._requests[rid] = (pending, frames)
        self._send(frames)

    # -- groups ----------------------------------------------------------------------------------

    def join_group(self, group: GroupState) -> None:
        def op() -> None:
            self.groups[group.name] = group
            self._send([P.JOIN, group.name.encode(), P.pack(group.body)])
        self.call(op)

    def leave_group(self, name: str) -> None:
        def op() -> None:
            if self.groups.pop(name, None) is not None:
                self._send([P.LEAVE, name.encode()])
        self.call(op)

    def ack(self, name: str, seqs: list[int]) -> None:
        self.call(lambda: self._send([P.ACK, name.encode(), P.pack(seqs)]))

    def nack(self, name: str, items: list[tuple[int, str, float]]) -> None:
        self.call(lambda: self._send([P.NACK, name.encode(), P.pack([list(i) for i in items])]))

    def touch(self, name: str) -> None:
        self.call(lambda: self._send([P.TOUCH, name.encode()]))

    # -- timers ----------------------------------------------------------------------------------

    def _timers(self) -> None:
        now = time.monotonic()
        if now - self._last_ping >= self.heartbeat_s:
            self._last_ping = now
            self._send([P.PING])
        silent = now - max(self._last_heard, self._last_hello)
        if silent > 3 * self.heartbeat_s and now - self._last_hello > self._hello_backoff:
            self._reconnect()
        if self._batches:
            for bid, batch in list(self._batches.items()):
                live = [i for i in batch.items if i.deadline > now]
                if len(live) < len(batch.items):
                    with self.cond:
                        for item in batch.items:
                            if item.deadline <= now and not item.done:
                                self._answered += item.count or 1
                                item.error = TimeoutError(
                                    "publish not acknowledged in time (it may still be logged; publish again "
                                    "with the same message_id to be sure)", message_id="")
                                item._settle()
                        self.cond.notify_all()
                    if not live:
                        del self._batches[bid]
                        continue
                if now - batch.sent_at > RESEND_AFTER_S and self.welcome is not None:
                    batch.sent_at = now
                    self.counters.resent += batch.count
                    self._send([P.PUB, P.pack_id(bid), batch.frame])
        if self._reply_deadlines and self._reply_deadlines[0][0] <= now:
            with self.cond:
                while self._reply_deadlines and self._reply_deadlines[0][0] <= now:
                    _, request_id, timeout = heapq.heappop(self._reply_deadlines)
                    waiter = self._waiters.pop(request_id, None)
                    if waiter is not None and not waiter.done:
                        waiter.error = TimeoutError(f"no reply within {timeout} s", timeout=timeout)
                        waiter._settle()
                self.cond.notify_all()
        if self._pubq and self._pubq[0].deadline <= now:
            with self.cond:
                while self._pubq and self._pubq[0].deadline <= now:
                    item = self._pubq.popleft()
                    self._answered += item.count or 1
                    item.error = TimeoutError("publish not sent in time: no broker", message_id="")
                    item._settle()
                self.cond.notify_all()

    def _reconnect(self) -> None:
        """The broker went quiet: find it again (it may have moved) and say HELLO with back-off."""
        self.welcome = None
        self.connected.clear()
        self._hello_backoff = min(self._hello_backoff * 2, 2.0)
        new = self._resolve_endpoint() if self._resolve_endpoint else None
        if new and new != self.endpoint:
            log.info("client.endpoint_changed", old=self.endpoint, new=new)
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disconnect(self.endpoint)
            self.endpoint = new
            self.sock.connect(new)
        self._hello()


def decode_replayed(raw: bytes) -> tuple[int, bool, list[Envelope]]:
    """A REPLAYED body: (next_seq, done, envelopes)."""
    return _replayed_decoder.decode(raw)
