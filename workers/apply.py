"""Applying a batch of logged messages to a backend: the exactly-once core of every worker.

Pure logic (no sockets): the runtime feeds it deliveries from the bus; the store
tests feed it envelopes directly. One store transaction per batch records the
outcome of every message, the outbox of replies and change events, and the log
position, so a crash at any instant neither loses nor doubles an effect.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus.logs import handling
from bus.protocol import DEAD_LETTER_TOPIC
from contracts.envelope import Envelope, encode_new
from contracts.errors import (
    BusError,
    HandlerError,
    MessageTooLarge,
    StoreRejected,
    StoreUnavailable,
    UnknownTopic,
)
from contracts.registry import decode_payload, encode_payload, to_builtins
from contracts.topics import reply_topics
from workers.base import Backend, Context

log = structlog.get_logger("membus.worker")


@dataclass
class Outcome:
    seq: int
    topic: str
    status: str
    """applied | observed (recorded, never answered) | failed (answered with .failed) |
    skipped (already applied) | retry (transient error)"""
    reply: Any = None
    error: BusError | None = None
    events: list[tuple[str, Any]] = field(default_factory=list)
    event_bodies: list[tuple[str, bytes]] | None = None
    """The events' payloads, encoded (and checked against the broker's limit) while the write could be undone."""


def derived_id(worker: str, seq: int, index: int, *, ordered_from: int | None = None) -> str:
    """Deterministic id of the index-th message a worker publishes for log entry seq.

    Republishing after a crash, or a rebuild, sends the same id, and the broker stores it once. From seq
    ``ordered_from`` on (the broker's ``ordered_ids_from``: None for a broker that predates it) the id is the
    worker's tag, the seq and the index, so ids follow the log and land together in the broker's id index;
    before it, the older hashed form, which the replies logged then carry.
    """
    if ordered_from is not None and seq >= ordered_from:
        return f"W{_worker_tag(worker)}{seq:016X}{index:04X}"
    digest = hashlib.blake2b(f"{worker}:{seq}:{index}".encode(), digest_size=10).digest()
    return "W" + digest.hex().upper()


@functools.cache
def _worker_tag(worker: str) -> str:
    return hashlib.blake2b(worker.encode(), digest_size=8).hexdigest().upper()  # 64 bits: no two workers share one


def event_bodies(events: list[tuple[str, Any]], limit: int) -> list[tuple[str, bytes]]:
    """The events' encoded payloads; MessageTooLarge if one is over the broker's limit (the write that made it
    must be undone: an event the broker refuses would stay in the outbox, and block it, for ever)."""
    out = []
    for topic, payload in events:
        body = encode_payload(topic, payload)
        if len(body) > limit:
            raise MessageTooLarge(f"its {topic} event would be {len(body)} bytes, over the broker's limit of "
                                  f"{limit} (max_message_bytes): nothing was written", topic=topic,
                                  field="payload", size=len(body), limit=limit)
        out.append((topic, body))
    return out


def outgoing(worker: str, env: Envelope, outcome: Outcome, limit: int, *,
             ordered_from: int | None = None) -> list[bytes]:
    """The encoded change events, then the reply, that an outcome publishes; a reply over ``limit`` bytes is
    replaced by a ``.failed`` one saying so. ``ordered_from``: see derived_id."""
    out: list[bytes] = []

    def message_id(index: int) -> str:
        return derived_id(worker, env.seq, index, ordered_from=ordered_from)

    bodies = outcome.event_bodies
    if bodies is None:
        bodies = [(topic, encode_payload(topic, payload)) for topic, payload in outcome.events]
    for i, (topic, body) in enumerate(bodies):
        out.append(encode_new(topic, body, correlation_id=env.correlation_id,
                              causation_id=env.id, message_id=message_id(i))[1])
    if outcome.status == "failed" and isinstance(outcome.error, HandlerError | StoreRejected):
        dead = {"group": worker, "seq": env.seq, "topic": env.topic, "message_id": env.id,
                "attempts": outcome.error.fields.get("attempts", 0), "reason": outcome.error.message}
        out.append(encode_new(DEAD_LETTER_TOPIC, encode_payload(DEAD_LETTER_TOPIC, dead),
                              correlation_id=env.correlation_id, causation_id=env.id,
                              message_id=message_id(999))[1])
    if env.reply_to and outcome.status in ("applied", "failed"):
        complete, failed = reply_topics(env.topic)
        if outcome.status == "applied":
            topic, body = complete, encode_payload(complete, outcome.reply)
            if len(body) > limit:
                too_large = MessageTooLarge(f"the reply would be {len(body)} bytes, over the broker's limit of {limit} "
                                            "(max_message_bytes): ask for less (a smaller limit)", topic=env.topic,
                                            size=len(body), limit=limit)
                topic, body = failed, encode_payload(failed, too_large.to_wire())
        else:
            assert outcome.error is not None
            topic, body = failed, encode_payload(failed, outcome.error.to_wire())
        out.append(encode_new(topic, body, correlation_id=env.correlation_id, causation_id=env.id,
                              recipient=env.reply_to, message_id=message_id(1000))[1])
    return out


def apply_batch(backend: Backend, batch: list[Envelope], *, position: int | None = None,
                final_attempt: set[int] | frozenset[int] = frozenset(),
                attempt: int = 1, condemned: Mapping[int, BusError] | None = None) -> tuple[list[Outcome], int]:
    """Applies ``batch`` (in log order) in one transaction; returns the outcomes and the new position.

    A message whose handler raises an unexpected error is rolled back alone and reported as
    ``retry``, unless its seq is in ``final_attempt``, where it is answered with ``.failed``
    (the runtime dead-letters it, after ``attempt`` attempts). ``retry`` outcomes do not move the
    position past them. A seq at or below the position, including one already applied earlier in
    this batch (a redelivery after an ack timeout can sit in the same batch), is ``skipped``.
    A StoreUnavailable (full disk, I/O error) from a handler or the commit aborts the whole batch: nothing is
    applied, and the caller tries it again. So does a StoreRejected (the store refused a write, often only at
    commit); the caller then applies the batch in halves. A message in ``condemned`` is not handled: it fails
    with its error there, and is dead-lettered (workers/suspects.py, or a message the store rejected alone).
    """
    if position is None:
        position = backend.load_position()
    outcomes: list[Outcome] = []
    new_position = position
    blocked = False
    with backend.transaction() as txn:
        for env in batch:
            if env.seq <= new_position:
                outcomes.append(Outcome(env.seq, env.topic, "skipped"))
                continue
            if blocked:
                outcomes.append(Outcome(env.seq, env.topic, "retry"))
                continue
            if condemned and env.seq in condemned:
                outcome = Outcome(env.seq, env.topic, "failed", error=condemned[env.seq])
            else:
                outcome = _apply_one(backend, txn, env, attempt if env.seq in final_attempt else 0)
            outcomes.append(outcome)
            if outcome.status == "retry":
                blocked = True  # keep log order: nothing after a retried message is applied yet
                continue
            items = outgoing(backend.name, env, outcome, backend.max_payload_bytes,
                             ordered_from=backend.ordered_ids_from)
            if items:
                backend.outbox_add(txn, env.seq, items)
            new_position = env.seq
        if new_position != position:
            backend.save_position(txn, new_position)
    return outcomes, new_position


def _apply_one(backend: Backend, txn: Any, env: Envelope, final: int) -> Outcome:
    """``final``: the number of this attempt when it is the last one, else 0."""
    handler = backend.handlers.get(env.topic)
    ctx = Context(seq=env.seq, envelope=env, worker=backend.name)
    with handling(env, backend.name):
        try:
            if handler is None and backend.observes(env.topic):
                try:
                    payload = decode_payload(env.topic, env.payload)
                except BusError:
                    payload = None  # someone else's invalid request: theirs to answer, ours to count
                with backend.savepoint(txn):
                    backend.observe(txn, payload, ctx)
                    bodies = event_bodies(ctx.events, backend.max_payload_bytes)
                return Outcome(env.seq, env.topic, "observed", events=ctx.events, event_bodies=bodies)
            if handler is None:
                raise UnknownTopic(f"worker {backend.name!r} has no handler for topic {env.topic!r}",
                                   topic=env.topic, field="topic", expected=", ".join(sorted(backend.handlers)))
            payload = decode_payload(env.topic, env.payload)
            with backend.savepoint(txn):
                reply = handler(backend, txn, payload, ctx)
                bodies = event_bodies(ctx.events, backend.max_payload_bytes)
            return Outcome(env.seq, env.topic, "applied", reply=reply, events=ctx.events, event_bodies=bodies)
        except (StoreUnavailable, StoreRejected):
            raise  # the whole batch is rolled back: tried again later, or (rejected) in halves by the runtime
        except BusError as exc:
            log.info("message.failed", code=exc.code, error=exc.message)
            return Outcome(env.seq, env.topic, "failed", error=exc)
        except Exception as exc:
            log.warning("handler.error", error=repr(exc), final=final)
            if final:
                err = HandlerError(f"{type(exc).__name__}: {exc}", topic=env.topic, exception=type(exc).__name__,
                                   attempts=final)
                return Outcome(env.seq, env.topic, "failed", error=err)
            return Outcome(env.seq, env.topic, "retry", error=HandlerError(repr(exc)))


def reply_as_builtins(outcome: Outcome) -> Any:
    return to_builtins(outcome.reply)
