"""What a store worker is made of: a backend that owns one store, and its handlers.

The runtime (workers/runtime.py) drives a backend like this, for every batch it
receives from the backend's consumer group::

    with backend.transaction() as txn:
        for msg in batch:
            if msg.seq <= position: continue          # already applied: never doubled
            with backend.savepoint(txn):             # a failing message rolls back alone
                reply = handler(backend, txn, payload, ctx)
        backend.outbox_add(txn, seq, [encoded replies and change events])
        backend.save_position(txn, last_seq)          # same transaction as the writes
    publish the outbox (deterministic ids: the broker drops duplicates), then outbox_remove, then ack

Handlers are methods marked with ``@handles("topic")``; the topic's payload
contract comes from contracts.registry. A handler returns the reply payload (or
None) and may call ``ctx.emit(topic, payload)`` for change events. It raises a
``contracts.errors.BusError`` subclass for an answer that is an error (sent as
``.failed``, not retried); any other exception is retried and, after the last
attempt, dead-lettered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from bus.home import Settings
from contracts.envelope import Envelope

F = TypeVar("F", bound=Callable[..., Any])


def handles(topic: str) -> Callable[[F], F]:
    """Marks a backend method as the handler of ``topic``."""

    def mark(fn: F) -> F:
        fn.__membus_topic__ = topic  # type: ignore[attr-defined]
        return fn

    return mark


@dataclass
class Context:
    """What a handler knows about the message it applies, and how it announces changes."""

    seq: int
    envelope: Envelope
    worker: str
    events: list[tuple[str, Any]] = field(default_factory=list)

    def emit(self, topic: str, payload: Any) -> None:
        """Publishes a change event after the transaction commits (exactly once)."""
        self.events.append((topic, payload))


class Backend(ABC):
    """One store, owned by one worker process. Construct cheaply; open inside the process."""

    name: ClassVar[str]
    """The worker's name; also its consumer group and its folder under the data dir."""
    patterns: ClassVar[tuple[str, ...]]
    """Topic patterns the worker's consumer group receives."""
    max_payload_bytes: int = Settings.max_message_bytes
    """The broker's limit on a payload (``max_message_bytes``; the runtime sets the home's): a write whose
    change event would be larger is refused, a reply that would be larger is answered ``.failed``."""
    ordered_ids_from: int | None = None
    """The first log seq whose replies and change events get ids ordered by seq (the broker's, told at connect;
    the runtime sets it): workers.apply.derived_id."""
    ack_timeout_s: ClassVar[float | None] = None
    """How long the broker waits for an ack before it redelivers; None: the broker's default. A store whose
    batches take long sets more (a dead worker is still noticed at once, by its connection and heartbeats)."""
    handlers: ClassVar[dict[str, Callable[..., Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = dict(getattr(cls, "handlers", {}))
        for attr in vars(cls).values():
            topic = getattr(attr, "__membus_topic__", None)
            if topic:
                table[topic] = attr
        cls.handlers = table

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        self.data_dir = Path(data_dir)
        self.settings = settings

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """Commits on normal exit, rolls back on an exception; driver errors become StoreError."""

    @abstractmethod
    def savepoint(self, txn: Any) -> AbstractContextManager[None]:
        """Undoes only the writes made inside it when it exits with an exception."""

    @abstractmethod
    def load_position(self) -> int:
        """The last log sequence applied (0 for a new store)."""

    @abstractmethod
    def save_position(self, txn: Any, seq: int) -> None: ...

    @abstractmethod
    def outbox_add(self, txn: Any, seq: int, items: list[bytes]) -> None:
        """Keeps encoded envelopes to publish after commit, in the same transaction."""

    @abstractmethod
    def outbox_pending(self) -> list[tuple[int, list[bytes]]]:
        """What was committed but not yet confirmed published, oldest first."""

    @abstractmethod
    def outbox_remove(self, seqs: list[int]) -> None: ...

    def observes(self, topic: str) -> bool:
        """Whether a message on ``topic`` that has no handler is passed to ``observe`` (never answered)."""
        return False

    def observe(self, txn: Any, payload: Any, ctx: Context) -> None:
        """Records a message this worker follows without handling it (e.g. analytics of every reply)."""
        raise NotImplementedError(f"{type(self).__name__} observes topics but has no observe()")

    def stats(self) -> dict[str, Any]:
        return {}

    def idle(self) -> None:
        """Called when the worker has had nothing to apply for a while (e.g. to flush what commits left)."""
        return None

    def wipe(self) -> None:
        """Deletes the store's files (for rebuild from the log). The store must be closed."""
        import shutil

        shutil.rmtree(self.data_dir, ignore_errors=True)


def iter_handlers(backend: type[Backend]) -> Iterator[tuple[str, Callable[..., Any]]]:
    yield from sorted(backend.handlers.items())
