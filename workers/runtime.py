"""The worker process: joins its consumer group and applies what the log delivers, exactly once.

    membus worker lmdb --home DIR

It opens its store inside this process, publishes anything its outbox still
holds from before a crash, then consumes in batches: apply (workers/apply.py),
publish the outbox, ack. A transient handler error is retried here, in order,
with back-off; after ``max_attempts`` the message is answered ``.failed`` and
dead-lettered, and the worker goes on. A batch the store cannot take (a full disk, an I/O error: StoreError) is
tried again until it can, for as long as it takes (and below ``min_free_mb`` of free disk no batch goes to the
store at all, so it never gets full). A batch the store refuses to write for what one message holds (StoreRejected,
often known only at commit) is applied in halves until that message is alone; it is answered ``.failed`` and
dead-lettered unhandled, and the rest is applied. While one batch takes long, for whatever reason, a thread tells the
broker the worker is still working on its messages (TOUCH), so they are neither redelivered nor
dead-lettered. A store call that does not return in ``wedged_after_s`` ends the process through faulthandler's
native timer, which needs no GIL and prints every thread's stack first: a new process recovers, and ``membus up``
starts one. (On a full disk Chroma's upsert blocked holding the GIL after a failed compaction; in three runs of
four it was still blocked minutes after the disk had room again.) A message whose handling ends the process
every time is found and dead-lettered after ``max_attempts`` deaths (workers/suspects.py), so it cannot stop
the store for good. SIGTERM finishes the current batch.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from bus.client import Bus
from bus.connection import Pending
from bus.heap import freeze_startup_heap, thaw_heap
from bus.home import Home, write_json
from bus.message import Delivery
from bus.sealing import store_keyring
from bus.supervisor import SUPERVISOR_ENV, supervised
from contracts.catalog import load_all
from contracts.envelope import Envelope, decode_envelope
from contracts.errors import BusError, HandlerError, StoreError, StoreRejected, StoreUnavailable, ValidationError
from workers.apply import Outcome, apply_batch
from workers.base import Backend
from workers.registry import load
from workers.suspects import ApplyingMarker, Suspects

log = structlog.get_logger("membus.worker")


@dataclass
class _Sending:
    """Outbox entries on their way to the log: their log positions and the one Pending of their publish."""

    seqs: list[int]
    pending: Pending


@dataclass
class _Flight:
    """An applied batch whose outbox is being logged; its deliveries are acked when that is done."""

    outbox: _Sending | None
    """The batch's outbox being published, if it has one."""
    acks: list[int]

    def logged(self) -> bool:
        return self.outbox is None or self.outbox.pending.done


ISOLATE_IN = 16
"""After a process ended in a transaction of more messages than this, they are applied this many at a time, and
only a chunk that ends a process again goes one message at a time: recovering from an ordinary kill of a busy
worker costs a few dozen transactions, not one per message (the Chroma worker would embed each alone)."""

MAX_FLIGHTS = 2
"""Applied batches whose outbox may be on its way to the log while the next batch is applied (the group's credit
is one batch more). With 1 the worker waited ~19 % of its time for the previous batch's outbox at saturation;
2 gave +9 % store-pipeline throughput, 3 no more (docs/benchmarks.md, seventh pass)."""


class WorkerRuntime:
    def __init__(self, name: str, home: Home, *, batch_size: int = 500, max_attempts: int = 5,
                 retry_backoff_s: float = 0.2, ack_timeout_s: float | None = None,
                 wedged_after_s: float = 900.0, min_free_mb: int = 64, own_process: bool = False,
                 **settings: Any) -> None:
        self.name = name
        self.own_process = own_process
        """The process is this worker's (``membus worker``), not a host's (``membus rebuild`` runs one in a thread):
        its start-up heap is frozen once the store is open (bus/heap.py)."""
        self.home = home
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.backend: Backend = load(name)(home.data_dir(name), **settings)
        self.backend.max_payload_bytes = home.settings().max_message_bytes
        self.ack_timeout_s = ack_timeout_s or self.backend.ack_timeout_s
        self.wedged_after_s = wedged_after_s
        self.min_free_mb = min_free_mb
        """Below this much free space on the store's disk no batch goes to the store: the worker stalls as on a full
        disk, before its store meets one (Chroma on a full disk blocked in native code, holding the GIL)."""
        self._busy_since: float | None = None
        """When the worker took the batch it is applying, retries and stalls included (None between batches): its
        messages are touched while this lasts."""
        self._armed_at = 0.0
        """When faulthandler's timer was last set (0: not set)."""
        self._stop = False
        self.stats: dict[str, Any] = {"worker": name, "pid": os.getpid(), "applied": 0, "observed": 0, "failed": 0,
                                      "skipped": 0, "retried": 0, "dead_lettered": 0, "batches": 0,
                                      "last_batch": 0, "max_batch": 0, "position": 0, "errors": 0,
                                      "stalled": "", "suspects": "",
                                      "supervisor": int(os.environ.get(SUPERVISOR_ENV) or 0) or None}
        """``stalled``: why the store cannot take the current batch, while the worker keeps trying ("" otherwise).
        ``suspects``: the seqs a process ended while applying, now applied in chunks, then alone ("" otherwise).
        ``supervisor``: the pid of the ``membus up`` that restarts this worker when it ends (None: nothing does)."""
        self._last_status = 0.0
        self._status_unwritten = False
        """Whether the last status write failed: logged once, not every second, while the disk stays full."""
        self._sending: set[int] = set()
        """Outbox entries (by seq) published and not yet acknowledged by the broker."""
        self._added: list[tuple[int, list[bytes]]] = []
        """What the batch being applied adds to the outbox: published from memory, not read back."""
        self._logged: list[int] = []
        """Outbox entries already in the log, removed from the store in bulk (a resend would be stored once)."""
        self._logged_since = 0.0
        self._resync = False
        data_dir = self.backend.data_dir
        self._marker = ApplyingMarker(data_dir.with_name(data_dir.name + ".applying"))
        """Beside the store, not in it: a rebuilt store replays the same log, the same message included."""
        self._suspects: Suspects | None = None
        add = self.backend.outbox_add

        def tap(txn: Any, seq: int, items: list[bytes]) -> None:
            add(txn, seq, items)
            self._added.append((seq, items))

        self.backend.outbox_add = tap  # type: ignore[method-assign]

    def stop(self) -> None:
        self._stop = True

    def run(self) -> None:
        structlog.contextvars.bind_contextvars(worker=self.name)
        self.backend.open()
        self._suspects = self._marker.open()
        try:
            with Bus.connect(self.home.path, module=f"worker-{self.name}", timeout=30.0) as bus:
                self._flush_outbox(bus)
                position = self.backend.load_position()
                if self._suspects is not None and position >= self._suspects.last:
                    self._suspects = None  # the process ended after their commit: nothing to suspect
                self._show_suspects()
                self.stats["position"] = position
                if self.own_process:
                    log.info("worker.heap_frozen", objects=freeze_startup_heap())
                log.info("worker.started", position=position, patterns=list(self.backend.patterns))
                with bus.consume(self.name, list(self.backend.patterns),
                                 credit=(MAX_FLIGHTS + 1) * self.batch_size, ack_timeout=self.ack_timeout_s,
                                 position=position + 1) as consumer:
                    threading.Thread(target=self._touch_while_busy, args=(consumer,), name="membus-touch",
                                     daemon=True).start()
                    # Batches overlap: while the broker logs the outbox of up to MAX_FLIGHTS applied batches, the
                    # next one is applied. They land (outbox logged, deliveries acked) in order.
                    flights: deque[_Flight] = deque()
                    while not self._stop:
                        waiting = bool(flights)
                        batch = consumer.fetch(self.batch_size, timeout=0.0 if waiting else 0.5)
                        if batch:
                            position = self._process(bus, consumer, batch, position, flights)
                        while flights and (not batch or len(flights) > MAX_FLIGHTS or flights[0].logged()):
                            self._land(consumer, flights.popleft())
                        if not batch and not waiting:
                            self._disarm()
                            self._idle(bus)
                        self._write_status(bus.head)
                    self._land_all(consumer, flights)
                    self._remove_logged(force=True)
        finally:
            self._stop = True  # ends the touch thread too
            self._disarm()
            self._marker.close()
            self.backend.close()
            log.info("worker.stopped", position=self.stats["position"])

    def _process(self, bus: Bus, consumer: Any, batch: list[Delivery], position: int,
                 flights: deque[_Flight]) -> int:
        """Applies a batch; returns the new position, and adds the batch's outbox publishes to ``flights``.

        The caller lands the flights (waits for the outbox to be logged, clears it, acks) in order, after
        applying later batches. A batch with retries is landed here with every flight before it, before its
        retry, so its retries stay in log order.
        """
        self._busy_since = time.monotonic()
        try:
            suspects = self._suspects
            if suspects is None or not any(suspects.holds(d.seq) for d in batch):
                return self._apply_until_done(bus, consumer, batch, position, flights)
            inside = [d for d in batch if d.seq <= suspects.last]
            step = ISOLATE_IN if suspects.count > ISOLATE_IN else 1  # a big batch in chunks first, then alone
            for i in range(0, len(inside), step):
                position = self._apply_until_done(bus, consumer, inside[i:i + step], position, flights)
            rest = [d for d in batch if d.seq > suspects.last]
            if rest:
                position = self._apply_until_done(bus, consumer, rest, position, flights)
            if position >= suspects.last:
                self._suspects = None
                self._show_suspects()
            return position
        finally:
            self._busy_since = None

    def _apply_until_done(self, bus: Bus, consumer: Any, batch: list[Delivery], position: int,
                          flights: deque[_Flight]) -> int:
        pending = [d.message.envelope for d in batch]
        attempt = 1
        stalls = 0
        flight: _Flight | None = None
        rejected: dict[int, BusError] = {}
        """The message the store refused when it was applied alone: failed unhandled on the next try."""
        while pending:
            final = {e.seq for e in pending} if attempt >= self.max_attempts else set()
            self._added.clear()
            self._arm()
            deaths = self._suspects.deaths_of(pending[0].seq) if self._suspects and len(pending) == 1 else 0
            try:
                self._check_room()
                self._marker.mark(pending[0].seq, pending[-1].seq, deaths, len(pending))
                try:
                    condemned = self._condemned(pending[0], deaths) or rejected
                    self.backend.ordered_ids_from = bus.ordered_ids_from
                    outcomes, position = apply_batch(self.backend, pending, position=position, final_attempt=final,
                                                     attempt=attempt, condemned=condemned)
                finally:
                    self._marker.clear()
            except StoreError as exc:  # the store did not take the batch (disk full, I/O, a refusal): nothing applied
                if isinstance(exc, StoreRejected) and len(pending) > 1:
                    log.warning("batch.rejected", error=exc.message, first_seq=pending[0].seq, messages=len(pending))
                    seqs = {e.seq for e in pending}
                    rest = [d for d in batch if d.seq in seqs]
                    half = len(rest) // 2
                    position = self._apply_until_done(bus, consumer, rest[:half], position, flights)
                    return self._apply_until_done(bus, consumer, rest[half:], position, flights)
                if isinstance(exc, StoreRejected) and pending[0].seq not in rejected:
                    env = pending[0]
                    log.error("message.rejected", seq=env.seq, topic=env.topic, error=exc.message)
                    rejected[env.seq] = StoreRejected(
                        f"the {self.name} store refused what this message asked it to write: {exc.message}",
                        topic=env.topic, attempts=attempt)
                    continue
                self.stats["errors"] += 1
                stalls += 1
                log.error("batch.commit_failed", error=exc.message, code=exc.code, first_seq=pending[0].seq,
                          tries=stalls)
                self.stats["stalled"] = f"{exc.code}: {exc.message}"  # meanwhile _touch_while_busy holds them
                self._write_status(bus.head)
                if self._stop:
                    break
                time.sleep(min(self.retry_backoff_s * 2 ** min(stalls, 5), 5.0))
                continue
            self.stats["stalled"] = ""
            flight = _Flight(self._publish_outbox(bus), [o.seq for o in outcomes if o.status != "retry"])
            self._count(outcomes)
            retry_seqs = {o.seq for o in outcomes if o.status == "retry"}
            pending = [e for e in pending if e.seq in retry_seqs]
            if pending:
                self._land_all(consumer, flights)
                self._land(consumer, flight)
                flight = None
                if self._stop:
                    break  # not acked: the broker redelivers them to the next run
                attempt += 1
                self.stats["retried"] += 1
                time.sleep(min(self.retry_backoff_s * 2 ** (attempt - 2), 5.0))
        self.stats["position"] = position
        if flight is not None:
            flights.append(flight)
        return position

    def _show_suspects(self) -> None:
        s = self._suspects
        self.stats["suspects"] = "" if s is None else (
            f"seq {s.first}, which has ended {s.deaths} of at most {self.max_attempts} processes" if s.count == 1
            else f"{s.count} messages in seqs {s.first}..{s.last}, being applied when a process ended")

    def _condemned(self, env: Envelope, deaths: int) -> dict[int, HandlerError] | None:
        """The message to fail unhandled: one that has ended ``max_attempts`` processes applied alone."""
        if deaths < self.max_attempts:
            return None
        log.error("message.condemned", seq=env.seq, topic=env.topic, deaths=deaths)
        return {env.seq: HandlerError(
            f"the worker process ended {deaths} times while applying this message alone (a crash in native code, "
            f"an out-of-memory kill, or a store call that never returned): dead-lettered without running it again",
            topic=env.topic, attempts=deaths)}

    def _touch_while_busy(self, consumer: Any) -> None:
        """While one batch takes long (a third of the ack timeout: a slow store, retries, a full disk), its
        messages get new ack deadlines (TOUCH), which count no attempt: they are neither redelivered nor
        dead-lettered meanwhile."""
        touched = 0.0
        # A third of the group's (or the broker's) ack timeout, but no more often than the broker's 100 ms tick: a
        # tiny ack timeout (tests use 1 ms to force redeliveries) must not make this thread spin.
        every = max(0.1, (self.ack_timeout_s or self.home.settings().ack_timeout_s) / 3)
        while not self._stop:
            time.sleep(min(1.0, every / 2))
            since, now = self._busy_since, time.monotonic()
            if since is not None and now - since >= every and now - touched >= every:
                consumer.touch()
                touched = now

    def _check_room(self) -> None:
        if self.min_free_mb <= 0:
            return
        try:
            free = shutil.disk_usage(self.backend.data_dir).free
        except OSError:  # no folder to ask about: the store reports what is wrong when it is written
            return
        if free < self.min_free_mb << 20:
            raise StoreUnavailable(f"the disk holding {self.backend.data_dir} has {free >> 20} MiB free, less than "
                                   f"the {self.min_free_mb} MiB the worker keeps in reserve "
                                   f"(MEMBUS_WORKER_MIN_FREE_MB)", free_bytes=free)

    def _arm(self) -> None:
        """Ends the process if the store has not returned ``wedged_after_s`` from now. The timer is re-set at most
        once a second (setting it starts a thread: ~50 µs), so it fires ``wedged_after_s`` - 1 s into a call at
        the earliest."""
        now = time.monotonic()
        if now - self._armed_at >= 1.0:
            faulthandler.dump_traceback_later(self.wedged_after_s, exit=True)
            self._armed_at = now

    def _disarm(self) -> None:
        if self._armed_at:
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = 0.0

    def _land_all(self, consumer: Any, flights: deque[_Flight]) -> None:
        while flights:
            self._land(consumer, flights.popleft())

    def _land(self, consumer: Any, flight: _Flight) -> None:
        """Acks a batch once its outbox (replies, change events) is in the log."""
        self._settle_outbox(flight.outbox)
        consumer.ack(flight.acks)

    def _count(self, outcomes: list[Outcome]) -> None:
        n = len(outcomes)
        self.stats["batches"] += 1
        self.stats["last_batch"] = n
        self.stats["max_batch"] = max(self.stats["max_batch"], n)
        for o in outcomes:
            if o.status in ("applied", "observed", "failed", "skipped"):
                self.stats[o.status] += 1
            if o.status == "failed" and isinstance(o.error, HandlerError | StoreRejected):
                self.stats["dead_lettered"] += 1

    def _flush_outbox(self, bus: Bus) -> None:
        """Publishes everything the store's outbox holds (at start, when idle, after a failed publish)."""
        self._remove_logged(force=True)
        self._resync = False
        self._settle_outbox(self._publish_outbox(bus, self._publishable(self.backend.outbox_pending())))

    def _publishable(self, entries: list[tuple[int, list[bytes]]]) -> list[tuple[int, list[bytes]]]:
        """The entries without their items the broker refuses as too large (written by code that did not check,
        or before ``max_message_bytes`` was lowered): such an item would be refused on every retry, and hold
        back everything published with it. Each one dropped is logged, with its topic and size."""
        limit = self.backend.max_payload_bytes
        if not any(len(item) > limit for _, items in entries for item in items):  # a payload is within its item
            return entries
        out = []
        for seq, items in entries:
            kept = []
            for item in items:
                env = decode_envelope(item) if len(item) > limit else None
                if env is not None and len(env.payload) > limit:
                    self.stats["errors"] += 1
                    log.error("outbox.dropped_too_large", seq=seq, topic=env.topic, size=len(env.payload),
                              limit=limit)
                    continue
                kept.append(item)
            if kept:
                out.append((seq, kept))
            else:  # nothing of it can be published: cleared from the store like a logged entry
                if not self._logged:
                    self._logged_since = time.monotonic()
                self._logged.append(seq)
        return out

    def _publish_outbox(self, bus: Bus, entries: list[tuple[int, list[bytes]]] | None = None) -> _Sending | None:
        """Publishes outbox entries not already on their way, in one publish: by default what the last batch
        added (ids are deterministic: the broker stores a resent item once)."""
        if entries is None:
            entries, self._added = self._added, []
            if self._resync:  # an earlier publish failed: everything the store holds, this batch's included
                self._flush_outbox(bus)
                return None
        sending = [(seq, items) for seq, items in entries if seq not in self._sending]
        if not sending:
            return None
        seqs = [seq for seq, _ in sending]
        self._sending.update(seqs)
        return _Sending(seqs, bus.publish_raw_many([item for _, items in sending for item in items], timeout=30.0))

    def _remove_logged(self, force: bool = False) -> None:
        """Clears logged outbox entries from the store: in bulk, at most once a second (one store commit)."""
        if self._logged and (force or len(self._logged) >= 5000 or time.monotonic() - self._logged_since > 1.0):
            self.backend.outbox_remove(self._logged)
            self._logged = []

    def _settle_outbox(self, outbox: _Sending | None) -> None:
        """Waits until the entries are logged and clears them from the store; a failure leaves them for later."""
        if outbox is None:
            return
        try:
            outbox.pending.result(35.0)
        except BusError as exc:
            self.stats["errors"] += 1
            self._resync = True  # it stays in the store's outbox; the next batch publishes everything again
            log.warning("outbox.publish_failed", seqs=f"{outbox.seqs[0]}..{outbox.seqs[-1]}", error=exc.message)
        else:
            if not self._logged:
                self._logged_since = time.monotonic()
            self._logged.extend(outbox.seqs)
        finally:
            self._sending.difference_update(outbox.seqs)
        self._remove_logged()

    def _idle(self, bus: Bus) -> None:
        self._flush_outbox(bus)  # what a broker outage left unpublished goes out without waiting for traffic
        expire = getattr(self.backend, "expire", None)
        if callable(expire):
            try:
                expire(time.time())
            except BusError as exc:
                log.warning("worker.expire_failed", error=exc.message)
        try:
            self.backend.idle()
        except (BusError, OSError) as exc:
            log.warning("worker.idle_failed", error=getattr(exc, "message", repr(exc)))

    def _write_status(self, head: int) -> None:
        now = time.monotonic()
        if now - self._last_status < 1.0:
            return
        self._last_status = now
        path = self.home.path / "run" / f"worker-{self.name}.json"
        try:
            write_json(path, dict(self.stats, head=head, lag=max(0, head - int(self.stats["position"])),
                                  updated=time.time(), store=self.backend.stats()))
        except OSError as exc:  # a full disk: the status stays as it was, the worker goes on (and waits for room)
            if not self._status_unwritten:
                log.warning("worker.status_unwritten", path=str(path), error=repr(exc))
            self._status_unwritten = True
        else:
            self._status_unwritten = False


def read_worker_status(home: Home) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted((home.path / "run").glob("worker-*.json")):
        try:
            out[p.stem.removeprefix("worker-")] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


RUNTIME_ENV = {"batch_size": "MEMBUS_WORKER_BATCH_SIZE", "max_attempts": "MEMBUS_WORKER_MAX_ATTEMPTS",
               "retry_backoff_s": "MEMBUS_WORKER_RETRY_BACKOFF_S", "ack_timeout_s": "MEMBUS_WORKER_ACK_TIMEOUT_S",
               "wedged_after_s": "MEMBUS_WORKER_WEDGED_AFTER_S", "min_free_mb": "MEMBUS_WORKER_MIN_FREE_MB"}
"""Runtime settings a deployment (or a test) can set from the environment."""


RUNTIME_BOUNDS = {"batch_size": (1, 10_000), "max_attempts": (1, 2**31 - 1), "retry_backoff_s": (0, 3_600),
                  "ack_timeout_s": (0.001, 7 * 86_400), "wedged_after_s": (1, 7 * 86_400), "min_free_mb": (0, 2**62)}


def runtime_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The settings ``RUNTIME_ENV`` names, checked against ``RUNTIME_BOUNDS`` (a batch size of 0 would fetch
    nothing for ever)."""
    out: dict[str, Any] = {}
    for key, var in RUNTIME_ENV.items():
        if not environ.get(var):
            continue
        low, high = RUNTIME_BOUNDS[key]
        try:
            value = float(environ[var]) if key.endswith("_s") else int(environ[var])
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            kind = "a number" if key.endswith("_s") else "an integer"
            raise ValidationError(f"{var}={environ[var]!r}: expected {kind} from {low} to {high}", field=var,
                                  expected=f"{low}..{high}")
        out[key] = value
    return out


def run(name: str, home: Path | str | None = None) -> None:
    load_all()
    where = Home(home)
    try:
        _run(name, where)
    except Exception as exc:
        _record_exit(where, name, exc)
        raise


def _record_exit(home: Home, name: str, exc: Exception) -> None:
    """Why the worker ended, in its status file, for `membus status` (a worker that cannot open its store is
    restarted by `membus up` again and again; without this, status showed it stopped and no reason)."""
    path = home.path / "run" / f"worker-{name}.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        status = {}
    status.update(pid=os.getpid(), exited=f"{getattr(exc, 'message', None) or exc}", exited_at=time.time())
    with contextlib.suppress(OSError):  # the home may be what is gone: it is not made again here
        write_json(path, status)


def _run(name: str, where: Home) -> None:
    at_rest: dict[str, Any] = {"encryption": store_keyring(where.path, name, where.settings().encryption)}
    runtime = WorkerRuntime(name, where, **runtime_settings(), **where.settings().store_settings(name),
                            **{k: v for k, v in at_rest.items() if v}, own_process=True)

    def _stop(signum: int, _frame: Any) -> None:
        log.info("worker.signal", signal=signum)
        runtime.stop()

    signal.signal(signal.SIGTERM, _stop)
    if not supervised():  # under `membus up`, Ctrl-C is the supervisor's (bus/supervisor.py)
        signal.signal(signal.SIGINT, _stop)
    from bus.consistency import hold_store  # the store lock a rebuild takes (see bus/consistency.py)

    lock = hold_store(where, name, lambda: runtime._stop)
    if lock is None:
        return
    try:
        runtime.run()
    finally:
        lock.release()
        thaw_heap()


def envelopes(batch: list[Delivery]) -> list[Envelope]:
    return [d.message.envelope for d in batch]
