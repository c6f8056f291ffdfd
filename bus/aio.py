"""The asyncio twin of bus/client.py: the same method names, awaited.

    from bus.aio import AsyncBus

    async with await AsyncBus.connect(module="notes") as bus:
        seq = await bus.publish("notes.note.changed", {"id": 1})
        async with bus.subscribe("notes.>") as sub:
            async for msg in sub: ...

It shares the sync client's I/O thread (bus/connection.py); results cross into
the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

from bus import protocol as P
from bus.client import Bus, Consumer, Subscription, build_request, replay_body, reply_message
from bus.connection import MAX_OUTSTANDING, Pending, decode_replayed, seconds
from bus.message import Delivery, Message
from contracts.envelope import encode_envelope
from contracts.errors import BusError, ConnectionError, TimeoutError


def _future(loop: asyncio.AbstractEventLoop, pending: Pending) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(p: Pending) -> None:
        def apply() -> None:
            if fut.done():
                return
            if p.error is not None:
                fut.set_exception(p.error)
            else:
                fut.set_result(p.value)

        # a closed loop took its awaiter with it (an abandoned call): nobody to tell
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(apply)

    pending.add_done_callback(settle)
    return fut


async def _wait(fut: asyncio.Future[Any], timeout: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(fut, timeout)
    except builtins.TimeoutError:
        raise TimeoutError(f"{what}: no answer within {timeout} s", timeout=timeout) from None


class AsyncBus:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._conn = bus._conn

    @classmethod
    async def connect(cls, home: Path | str | None = None, *, module: str = "app", endpoint: str | None = None,
                      server_key: bytes | None = None, timeout: float = 10.0,
                      max_outstanding: int = MAX_OUTSTANDING) -> AsyncBus:
        bus = await asyncio.to_thread(Bus.connect, home, module=module, endpoint=endpoint, server_key=server_key,
                                      timeout=timeout, max_outstanding=max_outstanding)
        return cls(bus)

    @property
    def source(self) -> str:
        return self._bus.source

    @property
    def head(self) -> int:
        return self._bus.head

    @property
    def ordered_ids_from(self) -> int | None:
        return self._bus.ordered_ids_from

    async def close(self) -> None:
        await asyncio.to_thread(self._bus.close)

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def publish_nowait(self, topic: str, payload: Any, **kw: Any) -> asyncio.Future[Any]:
        """A future of the seq; lets one task keep many publishes in flight."""
        loop = asyncio.get_running_loop()  # before sending: outside a loop, nothing is published
        return _future(loop, self._bus.publish_nowait(topic, payload, **kw))

    async def publish(self, topic: str, payload: Any, *, correlation_id: str = "", causation_id: str = "",
                      headers: dict[str, str] | None = None, message_id: str | None = None,
                      timeout: float = 10.0) -> int:
        fut = self.publish_nowait(topic, payload, correlation_id=correlation_id, causation_id=causation_id,
                                  headers=headers, message_id=message_id, timeout=timeout)
        return int(await _wait(fut, timeout + 1.0, f"publish {topic!r}"))

    def publish_many_nowait(self, topic: str, payloads: Iterable[Any], *,
                            message_ids: Sequence[str] | None = None, timeout: float = 30.0) -> asyncio.Future[Any]:
        """A future of the seqs of one message per payload (see Bus.publish_many_nowait)."""
        loop = asyncio.get_running_loop()
        return _future(loop, self._bus.publish_many_nowait(topic, payloads, message_ids=message_ids, timeout=timeout))

    async def publish_many(self, topic: str, payloads: Iterable[Any], *, message_ids: Sequence[str] | None = None,
                           timeout: float = 30.0) -> list[int]:
        fut = self.publish_many_nowait(topic, payloads, message_ids=message_ids, timeout=timeout)
        return list(await _wait(fut, timeout + 1.0, f"publish_many {topic!r}"))

    async def request(self, topic: str, payload: Any, *, timeout: float = 10.0, correlation_id: str = "",
                      headers: dict[str, str] | None = None) -> Message:
        loop = asyncio.get_running_loop()
        env = build_request(topic, payload, self._conn.inbox, correlation_id, headers, None)
        waiter = _future(loop, self._conn.await_reply(env.id, topic, env.correlation_id))
        try:
            await _wait(_future(loop, self._conn.submit_publish(encode_envelope(env), timeout)), timeout, topic)
            reply = await _wait(waiter, timeout, f"request {topic!r}")
        except TimeoutError:
            raise TimeoutError(f"no reply to {topic!r} within {timeout} s", topic=topic, timeout=timeout,
                               correlation_id=env.correlation_id) from None
        finally:
            self._conn.forget_reply(env.id)
        return reply_message(reply)

    def reply_nowait(self, request: Message, payload: Any = None, *, error: BusError | None = None,
                     timeout: float = 10.0) -> asyncio.Future[Any]:
        """A future of the seq of the reply to ``request`` (see Bus.reply_nowait)."""
        loop = asyncio.get_running_loop()
        return _future(loop, self._bus.reply_nowait(request, payload, error=error, timeout=timeout))

    async def reply(self, request: Message, payload: Any = None, *, error: BusError | None = None,
                    timeout: float = 10.0) -> int:
        """Answers ``request`` with its ``.complete`` (or, with ``error``, its ``.failed``); returns the reply's
        seq once logged (see Bus.reply)."""
        fut = self.reply_nowait(request, payload, error=error, timeout=timeout)
        return int(await _wait(fut, timeout + 1.0, f"reply to {request.topic!r}"))

    def request_nowait(self, topic: str, payload: Any, **kw: Any) -> asyncio.Future[Any]:
        """A future of the reply envelope (see Bus.request_nowait); lets one task keep many requests in flight."""
        loop = asyncio.get_running_loop()
        return _future(loop, self._bus.request_nowait(topic, payload, **kw))

    def publish_raw(self, data: bytes, *, timeout: float = 10.0) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        return _future(loop, self._bus.publish_raw(data, timeout=timeout))

    def publish_raw_many(self, envelopes: Sequence[bytes], *, timeout: float = 10.0) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        return _future(loop, self._bus.publish_raw_many(envelopes, timeout=timeout))

    @property
    def inbox(self) -> str:
        return self._bus.inbox

    async def status(self, *, timeout: float = 5.0) -> dict[str, Any]:
        seconds(timeout)
        loop = asyncio.get_running_loop()
        raw = await _wait(_future(loop, self._conn.request(lambda rid: [P.STATUS, P.pack_id(rid)])), timeout,
                          "status")
        result: dict[str, Any] = P.unpack(raw)
        return result

    async def replay(self, *, topic: str | None = None, from_seq: int = 1, to_seq: int | None = None,
                     since: float | None = None, until: float | None = None, correlation_id: str | None = None,
                     timeout: float = 10.0) -> AsyncIterator[Message]:
        seconds(timeout)
        loop = asyncio.get_running_loop()
        body = replay_body(topic=topic, from_seq=from_seq, to_seq=to_seq, since=since, until=until,
                           correlation_id=correlation_id)
        while True:
            page = self._conn.request(lambda rid: [P.REPLAY, P.pack_id(rid), P.pack(body)])
            next_seq, done, envs = decode_replayed(await _wait(_future(loop, page), timeout, "replay"))
            for env in envs:
                yield Message(env)
            if done:
                return
            body["from_seq"] = next_seq
            body["since_ns"] = None

    def subscribe(self, *patterns: str, from_seq: int | None = None, max_queued: int = 10_000) -> AsyncSubscription:
        return AsyncSubscription(self._bus.subscribe(*patterns, from_seq=from_seq, max_queued=max_queued))

    def consume(self, group: str, patterns: list[str] | tuple[str, ...] = (), **kw: Any) -> AsyncConsumer:
        return AsyncConsumer(self._bus.consume(group, patterns, **kw))


WAKE_CHECK_S = 0.25
"""A waiting get or fetch looks again this often even unwoken: a closed bus or a failure wakes nobody."""


class _Wakeup:
    """An asyncio event that the client's I/O thread sets when messages arrive for one subscription or consumer,
    so a waiting coroutine sleeps instead of polling (20 idle subscriptions polling every 5 ms took 4 % of a
    core)."""

    def __init__(self, owner: Subscription | Consumer) -> None:
        self._owner = owner
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def event(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._event is None or self._loop is not loop:
            self._loop, event = loop, asyncio.Event()

            def wake() -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                    loop.call_soon_threadsafe(event.set)

            self._event = event
            self._owner.waker = wake
        return self._event

    async def wait(self, event: asyncio.Event, deadline: float | None) -> None:
        left = WAKE_CHECK_S if deadline is None else min(WAKE_CHECK_S, deadline - time.monotonic())
        with contextlib.suppress(builtins.TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, left))


class AsyncSubscription:
    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self._wakeup = _Wakeup(sub)

    async def get(self, timeout: float | None = None) -> Message:
        deadline = None if timeout is None else time.monotonic() + seconds(timeout)
        event = self._wakeup.event()
        while True:
            event.clear()  # before looking: a message that arrives after the look sets it again
            try:
                return self._sub.get(timeout=0)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no message within {timeout} s", timeout=timeout) from None
            await self._wakeup.wait(event, deadline)

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except ConnectionError:
            if self._sub.ended:
                raise StopAsyncIteration from None
            raise

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._sub.close()

    def close(self) -> None:
        self._sub.close()

    @property
    def last_seq(self) -> int:
        return self._sub.last_seq

    @property
    def ended(self) -> bool:
        return self._sub.ended


class AsyncConsumer:
    def __init__(self, consumer: Consumer) -> None:
        self._c = consumer
        self._wakeup = _Wakeup(consumer)

    async def fetch(self, max_messages: int = 500, *, timeout: float | None = 1.0) -> list[Delivery]:
        """Takes from the consumer's queue in the loop, not in a thread: a cancelled fetch takes nothing."""
        deadline = None if timeout is None else time.monotonic() + seconds(timeout)
        event = self._wakeup.event()
        while True:
            event.clear()
            got = self._c.fetch(max_messages, timeout=0)
            if got or (deadline is not None and time.monotonic() >= deadline):
                return got
            await self._wakeup.wait(event, deadline)

    def __aiter__(self) -> AsyncIterator[Delivery]:
        """Every delivery, until the consumer or its bus is closed (a failure raises)."""
        return self._deliveries()

    async def _deliveries(self) -> AsyncIterator[Delivery]:
        while not self._c.ended:
            try:
                batch = await self.fetch(timeout=None)
            except ConnectionError:
                if self._c.ended:
                    return
                raise
            for delivery in batch:
                yield delivery

    async def ack(self, deliveries: list[Delivery] | list[int]) -> None:
        self._c.ack(deliveries)

    async def nack(self, deliveries: list[Delivery] | list[int], reason: str, *, delay: float = 0.0) -> None:
        self._c.nack(deliveries, reason, delay=delay)

    async def touch(self) -> None:
        self._c.touch()

    async def __aenter__(self) -> AsyncConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._c.close()

    def close(self) -> None:
        self._c.close()

    @property
    def ended(self) -> bool:
        return self._c.ended
