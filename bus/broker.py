"""The broker: one process, one ROUTER socket, one durable log.

Each turn of the loop drains whatever frames are waiting, appends every
published envelope in one LMDB transaction (one fsync: group commit), and only
then acknowledges the publishers, fans the new records out to live
subscribers and inboxes, and hands them to consumer groups within their credit.
Nothing is queued without bound: live subscribers have a high-water mark (the
client fills gaps from the log), group members get at most their credit, and
the backlog stays in the log.
"""

from __future__ import annotations

import contextlib
import heapq
import operator
import os
import signal
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import structlog
import zmq
from zmq.utils.monitor import parse_monitor_message

from bus import protocol as P
from bus.auth import ModuleAuthenticator
from bus.heap import freeze_startup_heap, thaw_heap
from bus.home import Home, Settings
from bus.log import EventLog, Prepared, Record, Rejected
from bus.permissions import Permissions, is_worker
from bus.sealing import log_cipher
from bus.supervisor import supervised
from bus.tail import TailCache
from bus.writer import LogWriter
from contracts.envelope import DECODE_ERRORS, Envelope, decode_batch, decode_envelope, make_envelope
from contracts.errors import BusError, NotAuthorized
from contracts.ids import new_id
from contracts.registry import encode_payload
from contracts.topics import COMPLETE, FAILED, check_pattern, check_topic, matches_any, reply_topics

log = structlog.get_logger("membus.broker")

_DRAIN = 2000
_WRITE_INLINE_MAX = 4
"""A turn with this few publishes (a quiet bus) is written on the loop's thread when the writer is idle: the
ack comes two thread hand-offs sooner. Bigger turns go to the writer thread, so the loop keeps receiving."""
_PICK_BYTES = 4 << 20
"""One turn of a group's pump hands out at most this many bytes (and at least one message): a worker's credit of
1,500 messages of 900 KB each made one 1.3 GB frame, and no one else was served while it was built."""
_SCAN_BUDGET = 20_000
_Raw = msgspec.Raw


@dataclass
class Client:
    rid: bytes
    source: str
    name: str = ""
    inbox: str = ""
    last_seen: float = 0.0
    subs: dict[int, LiveSub] = field(default_factory=dict)
    groups: set[str] = field(default_factory=set)


_Pubs = list[tuple["Client | None", bytes, list[Envelope]]]
"""Publishes drained in one turn: (client, its batch id, envelopes); client None for the broker's own."""


@dataclass
class LiveSub:
    sub_id: bytes
    patterns: tuple[str, ...]
    covered: int
    gap: bool = False


@dataclass(slots=True)
class Inflight:
    """Shared by every message of one DELIVER frame."""

    rid: bytes
    deadline: float


@dataclass
class Group:
    name: str
    patterns: tuple[str, ...]
    next_seq: int
    ack_timeout: float
    max_attempts: int
    members: dict[bytes, int] = field(default_factory=dict)
    """routing id -> credit left."""
    inflight: dict[int, Inflight] = field(default_factory=dict)
    redeliver: list[tuple[float, int]] = field(default_factory=list)
    """heap of (due time, seq)."""
    attempts: dict[int, int] = field(default_factory=dict)
    match_cache: dict[str, bool] = field(default_factory=dict)
    dead_letters: int = 0
    delivered: int = 0
    saved_floor: int = -1
    owner: str = ""
    """The module that made the group: only its runs may join it ("" for a group saved before owners: the
    next module to join takes it)."""

    def matches(self, topic: str) -> bool:
        hit = self.match_cache.get(topic)
        if hit is None:
            hit = self.match_cache[topic] = matches_any(self.patterns, topic)
        return hit

    @property
    def floor(self) -> int:
        """Every matching seq at or below the floor is acknowledged."""
        low = self.next_seq
        if self.inflight:
            low = min(low, min(self.inflight))
        if self.redeliver:
            low = min(low, min(s for _, s in self.redeliver))
        return low - 1

    def state(self) -> dict[str, Any]:
        return {"floor": self.floor, "patterns": list(self.patterns), "owner": self.owner}


class Broker:
    def __init__(self, home: Home, settings: Settings | None = None) -> None:
        self.home = home
        self.settings = settings or home.settings()
        self.log = EventLog(home.log_dir, map_size=self.settings.log_map_size,
                            max_map_size=self.settings.log_max_size,
                            cipher=log_cipher(home.path, self.settings.encryption))
        self.clients: dict[bytes, Client] = {}
        self.inboxes: dict[str, bytes] = {}
        self.groups: dict[str, Group] = {}
        self.counters: dict[str, int] = defaultdict(int)
        self.broker_id = new_id()
        self.endpoint = ""
        self._stop = False
        self._groups_dirty = False
        self.max_frame = P.max_frame(self.settings.max_message_bytes)
        self.permissions = Permissions(home.path / "permissions.toml")
        self._permissions_read = 0.0
        self._denied_recently: dict[tuple[str, str, str], float] = {}
        self._audit: list[dict[str, Any]] = []
        self._publish_grants: dict[tuple[str, str], bool] = {}
        self._committing: deque[tuple[Prepared, _Pubs]] = deque()
        """Batches handed to the log writer, in order, with the publishes they answer."""
        self._stuck: BusError | None = None
        """Set if the log's map cannot grow to hold what its journal holds: publishes are refused."""
        self.tail = TailCache(self.settings.tail_cache_bytes)
        """The newest records: groups that keep up never read the log."""

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.home.ensure()
        self.permissions.check()
        self.log.open()
        self.writer = LogWriter(self.log)
        for name, state in self.log.load_groups().items():
            floor = int(state.get("floor", 0))
            self.groups[name] = Group(name, tuple(state.get("patterns", ())), floor + 1,
                                      self.settings.ack_timeout_s, self.settings.max_attempts, saved_floor=floor,
                                      owner=str(state.get("owner", "")))
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.auth = ModuleAuthenticator(self.ctx, self.home)
        self.auth.start()
        self._allowed = self.auth.allowed_names()
        public, secret = self.home.broker_keys(create=True)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_frame)
        sock.setsockopt(zmq.SNDHWM, self.settings.live_hwm)  # per client; past it sends fail and are counted
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.linger = 0
        self._handshakes = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._bind(sock)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sock = sock
        self.home.write_run_file(self.endpoint)
        log.info("broker.started", endpoint=self.endpoint, head=self.log.head, groups=len(self.groups),
                 pid=os.getpid())

    def _bind(self, sock: zmq.Socket[Any]) -> None:
        """Binds the configured endpoint; with port 0, the port of the last run first, so clients find it again."""
        wanted = self.settings.endpoint
        last = (self.home.read_run_file() or {}).get("endpoint", "")
        if wanted.endswith(":0") and last.startswith(wanted[:-1]):
            try:
                sock.bind(last)
                return
            except zmq.ZMQError:
                log.info("broker.port_taken", endpoint=last)
        sock.bind(wanted)

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        if not self.writer.wait_idle(30):
            log.error("broker.writer_busy_at_close")
        self._on_reports()  # publishes the last commits' acks
        self.writer.close()
        with contextlib.suppress(BusError):
            states = {g.name: g.state() for g in self.groups.values()}
            if states:
                self.log.append([], groups=states)
        self.sock.disable_monitor()
        self._handshakes.close(linger=0)
        self.sock.close(linger=0)
        self.auth.stop()
        self.ctx.term()
        self.log.close()
        run = self.home.read_run_file()
        if run and run.get("pid") == os.getpid():
            self.home.run_file.unlink(missing_ok=True)
        log.info("broker.stopped", head=self.log.head)

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.writer.fileno(), zmq.POLLIN)
        next_tick = 0.0
        more = False  # a group's pump stopped at its byte budget: look again at once
        while not self._stop:
            now = time.monotonic()
            timeout = 0.0 if more else max(0.0, min(next_tick - now, 0.1))
            if poller.poll(int(timeout * 1000)):
                self._on_reports()
                self._drain()
            more = self._pump_groups()
            now = time.monotonic()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + min(0.1, self.settings.heartbeat_s / 4)

    # -- receiving -------------------------------------------------------------------------------

    def _drain(self) -> None:
        pubs: _Pubs = []
        for _ in range(_DRAIN):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                self._handle(frames, pubs)
            except Exception as exc:  # a bug on one frame must never take the broker down
                self.counters["internal_errors"] += 1
                log.exception("broker.frame_failed", error=repr(exc))
        if pubs:
            self._publish(pubs)

    def _handle(self, frames: list[zmq.Frame], pubs: _Pubs) -> None:
        rid = frames[0].bytes
        if len(frames) < 2:
            self._malformed(rid, b"", "empty message")
            return
        cmd = frames[1].bytes
        expected = P.CLIENT_COMMANDS.get(cmd)
        if expected is None:
            self.counters["unknown_commands"] += 1
            self._error(rid, b"", "protocol", f"unknown command {cmd[:32]!r}")
            return
        if len(frames) - 1 != expected:
            self._malformed(rid, b"", f"{cmd.decode()} takes {expected} frames, got {len(frames) - 1}")
            return
        if cmd == P.HELLO:
            self._hello(rid, frames)
            return
        client = self.clients.get(rid)
        if client is None:
            ref = frames[2].bytes if len(frames) > 2 and cmd in (P.PUB, P.REPLAY, P.STATUS, P.SUB) else b""
            self._error(rid, ref, "unknown_client", "say HELLO first (the broker may have restarted)")
            return
        client.last_seen = time.monotonic()
        try:
            if cmd == P.PUB:
                self._receive_pub(client, frames, pubs)
            elif cmd == P.PING:
                self._send(rid, P.PONG, P.pack_id(self.log.head))
            elif cmd == P.ACK:
                self._ack(client, frames[2].bytes.decode(), P.ack_body.decode(frames[3].buffer))
            elif cmd == P.NACK:
                self._nack(client, frames[2].bytes.decode(), P.nack_body.decode(frames[3].buffer))
            elif cmd == P.TOUCH:
                self._touch(client, frames[2].bytes.decode())
            elif cmd == P.SUB:
                self._subscribe(client, frames[2].bytes, P.unpack(frames[3].buffer))
            elif cmd == P.UNSUB:
                client.subs.pop(P.unpack_id(frames[2].bytes), None)
            elif cmd == P.JOIN:
                self._join(client, P.check_group_name(frames[2].bytes.decode()), P.join_body.decode(frames[3].buffer))
            elif cmd == P.LEAVE:
                self._leave(client, frames[2].bytes.decode())
            elif cmd == P.REPLAY:
                self._replay(client, frames[2].bytes, P.unpack(frames[3].buffer))
            elif cmd == P.REPLIES:
                self._resend_replies(client, P.replies_body.decode(frames[2].buffer))
            elif cmd == P.STATUS:
                self._send(rid, P.STATUSR, frames[2].bytes, P.pack(self.status()))
            elif cmd == P.BYE:
                self._drop_client(client, "bye")
        except (*DECODE_ERRORS, ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:
            ref = frames[2].bytes if len(frames) > 2 else b""
            self._malformed(rid, ref, f"bad {cmd.decode()} body: {exc}")
        except BusError as exc:
            ref = frames[2].bytes if len(frames) > 2 else b""
            self.counters["errors"] += 1
            self._error(rid, ref, exc.code, exc.message, **exc.fields)

    def _hello(self, rid: bytes, frames: list[zmq.Frame]) -> None:
        try:
            body = P.unpack(frames[2].buffer)
            name, inbox = str(body.get("client", "")), str(body.get("inbox", ""))
        except (*DECODE_ERRORS, AttributeError) as exc:
            self._malformed(rid, b"", f"bad HELLO body: {exc}")
            return
        source = str(frames[1].get("User-Id") or "unknown")
        if source not in self._allowed and source not in (allowed := self.auth.allowed_names()):
            self._allowed = allowed
            self._refuse_revoked(rid, source)  # revoked since its connection was made
            return
        if inbox and not inbox.startswith(f"inbox.{source}."):  # else one module could take another's replies
            self.counters["inbox_refused"] += 1
            log.warning("client.inbox_refused", source=source, inbox=inbox[:120])
            self._error(rid, b"", "not_authorized", f"module {source!r} may only use an inbox named "
                                                     f"inbox.{source}.*, not {inbox[:120]!r}", module=source)
            return
        old = self.clients.get(rid)
        if old is not None:
            self._drop_client(old, "re-hello")
        client = Client(rid, source, name, inbox, time.monotonic())
        self.clients[rid] = client
        if inbox:
            self.inboxes[inbox] = rid
        log.info("client.hello", client=name, source=source, inbox=inbox)
        proto = _proto(body)
        if proto < 2 and is_worker(source):
            self.counters["outdated_workers"] += 1
            log.warning("client.outdated_worker", source=source, proto=proto,
                        detail="this worker runs code older than the broker: restart it (`membus up` restarts "
                               "everything), or the replies it logs get ids a rebuild would not give them again")
        self._send(rid, P.WELCOME, P.pack({"broker": self.broker_id, "head": self.log.head,
                                            "heartbeat": self.settings.heartbeat_s,
                                            "max_message": self.settings.max_message_bytes, "source": source,
                                            "max_attempts": self.settings.max_attempts,
                                            "ordered_ids_from": self.log.ordered_ids_from}))

    def _malformed(self, rid: bytes, ref: bytes, message: str) -> None:
        self.counters["malformed"] += 1
        log.warning("frame.malformed", detail=message[:200])
        self._error(rid, ref, "protocol", message)

    def _error(self, rid: bytes, ref: bytes, code: str, message: str, **fields: Any) -> None:
        self._send(rid, P.ERROR, ref, P.error_body(code, message, **fields))

    def _send(self, rid: bytes, *frames: bytes) -> bool:
        return self._try_send(rid, *frames) == "sent"

    def _try_send(self, rid: bytes, *frames: bytes) -> str:
        """sent | full (the peer's queue is at its high-water mark) | gone (no such peer any more)."""
        try:
            self.sock.send_multipart([rid, *frames], zmq.NOBLOCK)
            return "sent"
        except zmq.Again:
            self.counters["send_dropped"] += 1
            return "full"
        except zmq.ZMQError:
            self.counters["send_dropped"] += 1
            return "gone"

    # -- publishing ------------------------------------------------------------------------------

    def _receive_pub(self, client: Client, frames: list[zmq.Frame],
                     pubs: _Pubs) -> None:
        batch_id = frames[2].bytes
        body = frames[3]
        if len(body) > self.max_frame:
            self.counters["too_large"] += 1
            self._error(client.rid, batch_id, "too_large",
                        f"publish frame of {len(body)} bytes exceeds {self.max_frame}", limit=self.max_frame)
            return
        try:
            envs = decode_batch(body.buffer)
        except DECODE_ERRORS as exc:
            self._malformed(client.rid, batch_id, f"PUB body is not an array of envelopes: {exc}")
            return
        source = str(frames[1].get("User-Id") or client.source)
        for env in envs:
            env.source = source
        taken = self.permissions.worker_id_taken(source, map(_id_of, envs))
        if taken is not None:  # else it could take the id of a worker's next reply or event, which is then dropped
            self._denied(source, "publish", f"message id {taken}")
            self._error(client.rid, batch_id, "not_authorized", f"module {source!r} may not publish message id "
                        f"{taken!r}: ids of the form W + 20 hex digits are the workers'", module=source)
            return
        pubs.append((client, batch_id, envs))

    def _check(self, env: Envelope) -> None:
        if len(env.payload) > self.settings.max_message_bytes:
            self.counters["too_large"] += 1
            raise Rejected("too_large", f"payload of {len(env.payload)} bytes on {env.topic!r} exceeds "
                                        f"{self.settings.max_message_bytes}")
        if self._publish_grants.get((env.source, env.topic)):
            return  # this module published this topic earlier in this append: already checked
        refused = self._refusal(env.source, env.topic)
        if refused is None:
            return
        why, rejected = refused
        if why == "denied":
            self._denied(env.source, "publish", env.topic)
        else:
            self.counters[why] += 1
        raise rejected

    def _refusal(self, source: str, topic: str) -> tuple[str, Rejected] | None:
        """Why ``source`` may not publish on ``topic`` (the counter to raise, or "denied"), or None if it may."""
        try:
            check_topic(topic)
        except BusError as exc:
            return "invalid", Rejected(exc.code, exc.message)
        if topic.startswith(("bus.", "security.")) and not (
                source == "broker" or (is_worker(source) and topic.startswith("bus."))):  # a worker's dead letters
            return "unauthorized", Rejected("not_authorized", f"topic {topic!r} is reserved for the broker")
        if source != "broker" and not self._may_publish(source, topic):
            return "denied", Rejected("not_authorized", f"module {source!r} may not publish {topic!r}")
        return None

    def _all_pass(self, envs: list[Envelope]) -> bool:
        """Whether ``_check`` would pass every envelope, judged once per module and topic: then the log needs no
        per-envelope check. When one would fail, ``_check`` runs per envelope (and counts what it refuses)."""
        if max(map(len, map(_payload_of, envs)), default=0) > self.settings.max_message_bytes:
            return False
        grants = self._publish_grants
        return all(grants.get(key) or self._refusal(*key) is None
                   for key in set(zip(map(_source_of, envs), map(_topic_of, envs), strict=True)))

    def _may_publish(self, source: str, topic: str) -> bool:
        """Decided once per (module, topic) per append: the permissions file is stat'ed per batch, not per message."""
        key = (source, topic)
        allowed = self._publish_grants.get(key)
        if allowed is None:
            allowed = self._publish_grants[key] = self.permissions.may_publish(source, topic)
        return allowed

    def _denied(self, module: str, action: str, what: str) -> None:
        """Counts a refusal, logs it, and records a ``security.access.denied`` audit event (once a second)."""
        self.counters["unauthorized"] += 1
        log.warning("access.denied", module=module, action=action, topic=what)
        key, now = (module, action, what), time.monotonic()
        if now - self._denied_recently.get(key, -10.0) >= 1.0:
            self._denied_recently[key] = now
            self._audit.append({"module": module, "action": action, "topic": what,
                                "reason": f"not in the {action} patterns of module {module!r}"})

    def _require_subscribe(self, client: Client, patterns: tuple[str, ...] | list[str]) -> None:
        for p in patterns or (">",):
            if not self.permissions.may_subscribe(client.source, p):
                self._denied(client.source, "subscribe", p)
                self._flush_audit()
                raise NotAuthorized(f"module {client.source!r} may not subscribe to {p!r}", pattern=p,
                                    module=client.source)

    def _flush_audit(self) -> None:
        events, self._audit = self._audit, []
        for ev in events:
            self.publish_internal("security.access.denied", ev)

    def _publish(self, pubs: _Pubs) -> None:
        """Prepares the drained publishes as one batch and hands it to the writer; _landed answers them."""
        if self._stuck is not None:
            self._refuse(pubs, self._stuck)
            return
        flat = [env for _, _, envs in pubs for env in envs]
        self._publish_grants.clear()
        try:
            batch = self.log.prepare(flat, None if self._all_pass(flat) else self._check,
                                     self._dirty_group_states())
        except Exception as exc:  # a read of the log failed: refuse this batch, keep serving
            log.exception("log.prepare_failed", error=repr(exc))
            self._refuse(pubs, exc)
            return
        self._committing.append((batch, pubs))
        if len(flat) <= _WRITE_INLINE_MAX and self.writer.write_now(batch):
            self._on_reports()
        else:
            self.writer.submit(batch)
        if self._audit:
            self._flush_audit()

    def _on_reports(self) -> None:
        for report in self.writer.reports():
            if report.error is None:
                self.log.committed(report.batches)
                for batch in report.batches:
                    self._landed(batch)
                if report.applied:
                    self.log.applied(report.applied)
            elif report.batches:
                self._write_failed(report.batches, report.error)
            else:
                self._apply_failed(report.error)

    def _apply_failed(self, error: BaseException) -> None:
        """Applying the journal to LMDB failed: the records are durable and served from memory meanwhile."""
        self.counters["log_apply_errors"] += 1
        if not isinstance(error, lmdb.MapFullError):
            return  # the writer tries again by itself
        try:
            self.log.grow(after_full=True)
        except BusError as exc:  # the journal's room check makes this unreachable; if not, take no more
            log.critical("log.cannot_apply", error=exc.message)
            self._stuck = exc
            return
        self.writer.resume_applies()

    def _landed(self, batch: Prepared) -> None:
        """A batch is durable: acknowledge its publishers, then hand its records to subscribers and inboxes."""
        done, pubs = self._committing.popleft()
        assert done is batch, "the writer reports batches in the order they were submitted"
        results = batch.results
        i = 0
        for client, batch_id, envs in pubs:
            out: list[Any] = results[i:i + len(envs)]
            i += len(envs)
            if batch.refused:
                out = [r if r.__class__ is int else [r.code, r.message] for r in out]
            if client is not None:
                self._send(client.rid, P.PUBACK, batch_id, P.pack(out))
        for name, state in batch.groups.items():
            group = self.groups.get(name)
            if group is not None:
                group.saved_floor = int(state["floor"])
        if batch.last < batch.first:
            return
        self.counters["published"] += batch.last - batch.first + 1
        self.tail.add(batch.first, batch.topics, batch.bodies)
        if batch.addressed or any(client.subs for client in self.clients.values()):
            self._fan_out([env for _, _, envs in pubs for env in envs if env.seq >= batch.first], batch.bodies)

    def _write_failed(self, batches: list[Prepared], error: BaseException) -> None:
        if isinstance(error, lmdb.MapFullError):
            try:
                self.log.grow(after_full=True)
                self.writer.resume(batches)
                return
            except BusError as exc:
                error = exc
        log.error("log.write_failed", error=repr(error), batches=len(self._committing))
        self.log.abandon()
        self.writer.resume([], drop_queued=True)
        committing, self._committing = self._committing, deque()
        for _, pubs in committing:
            self._refuse(pubs, error)

    def _refuse(self, pubs: _Pubs, error: BaseException) -> None:
        refusal = self.log.unavailable(error)
        for client, batch_id, envs in pubs:
            if client is not None:
                self._send(client.rid, P.PUBACK, batch_id, P.pack([[refusal.code, refusal.message] for _ in envs]))

    def publish_internal(self, topic: str, payload: Any, *, correlation_id: str = "", recipient: str = "",
                         causation_id: str = "") -> int:
        """Logs a message of the broker's own (dead letters, audit events); returns its seq (0 if refused)."""
        env = make_envelope(topic, encode_payload(topic, payload), correlation_id=correlation_id,
                            causation_id=causation_id, recipient=recipient)
        env.source = "broker"
        self._publish([(None, b"", [env])])
        if not env.seq:
            log.error("broker.internal_publish_failed", topic=topic)
        return env.seq

    def _fan_out(self, envs: list[Envelope], bodies: list[bytes]) -> None:
        """Live subscribers and inboxes get the new records (``bodies``: their stored envelopes) at once; groups
        pull them in _pump_groups."""
        first, last = envs[0].seq, envs[-1].seq
        for client in list(self.clients.values()):
            for sub in client.subs.values():
                picked = [_Raw(bodies[i]) for i, e in enumerate(envs) if matches_any(sub.patterns, e.topic)]
                if not picked:
                    continue
                start = first if sub.gap else sub.covered + 1
                if self._send(client.rid, P.LIVE, sub.sub_id, P.pack([start, last, picked])):
                    sub.covered, sub.gap = last, False
                else:
                    sub.gap = True
                    self.counters["live_dropped"] += len(picked)
        replies: dict[bytes, list[Envelope]] = {}
        for env in envs:
            if env.recipient:
                rid = self.inboxes.get(env.recipient)
                if rid is not None:
                    replies.setdefault(rid, []).append(env)
        for rid, batch in replies.items():  # one INBOX frame per client per turn
            self._send(rid, P.INBOX, P.pack(batch))

    # -- live subscriptions ----------------------------------------------------------------------

    def _subscribe(self, client: Client, sub_id_b: bytes, body: dict[str, Any]) -> None:
        patterns = tuple(check_pattern(str(p)) for p in body["patterns"])
        if not patterns:
            raise BusError("a subscription needs at least one pattern")
        self._require_subscribe(client, patterns)
        sub_id = P.unpack_id(sub_id_b)
        sub = LiveSub(sub_id_b, patterns, covered=self.log.head)
        client.subs[sub_id] = sub
        # An empty range starting after the head: the client fills anything it wants before that from the log.
        self._send(client.rid, P.LIVE, sub_id_b, P.pack([self.log.head + 1, self.log.head, []]))

    # -- consumer groups -------------------------------------------------------------------------

    def _join(self, client: Client, name: str, body: P.JoinBody) -> None:
        patterns = tuple(check_pattern(p) for p in body.patterns)
        group = self.groups.get(name)
        worker = f"worker-{name}"
        if is_worker(worker):  # a store worker's own group: made first by a module, it kept the worker out
            if client.source != worker:
                raise NotAuthorized(f"group {name!r} is the {name} worker's: module {client.source!r} may not join "
                                    "it", group=name, module=client.source)
            if group is not None and group.owner != worker:
                group.owner, group.saved_floor = worker, -1  # taken back from the module that made it
                self._groups_dirty = True
        if group is not None and group.owner not in ("", client.source):  # else it could take or redirect them
            raise NotAuthorized(f"group {name!r} belongs to module {group.owner!r}: module {client.source!r} may "
                                "not join it", group=name, module=client.source)
        self._require_subscribe(client, patterns or (group.patterns if group else ()))
        start = body.position
        if group is None:
            if not patterns:
                raise BusError(f"group {name!r} does not exist; give patterns to create it", group=name)
            next_seq = start or body.from_seq or 1
            group = Group(name, patterns, next_seq, body.ack_timeout or self.settings.ack_timeout_s,
                          body.max_attempts or self.settings.max_attempts, owner=client.source)
            self.groups[name] = group
            self._groups_dirty = True
            log.info("group.created", group=name, patterns=list(patterns), from_seq=next_seq)
        else:
            if not group.owner:
                group.owner = client.source
                group.saved_floor = -1  # saved with its owner at the next save
                self._groups_dirty = True
            if patterns and patterns != group.patterns:
                group.patterns = patterns
                group.match_cache.clear()
                self._groups_dirty = True
            if start:
                self._evict_stale_members(group, client)
            if start and not group.members:
                self._reposition(group, start)
        if body.ack_timeout:
            group.ack_timeout = body.ack_timeout
        if body.max_attempts:
            group.max_attempts = body.max_attempts
        group.members[client.rid] = body.credit
        client.groups.add(name)
        log.info("group.joined", group=name, client=client.name, members=len(group.members))

    def _evict_stale_members(self, group: Group, joining: Client) -> None:
        """A module that rejoins with its own position is a new run of it: an old member of the same
        module (killed with -9, not yet timed out) is dropped, its deliveries forgotten, not redelivered."""
        for rid in list(group.members):
            old = self.clients.get(rid)
            if old is not None and old is not joining and old.source == joining.source:
                self._drop_client(old, "replaced by a new run", requeue=False)

    def _reposition(self, group: Group, start: int) -> None:
        """A consumer that keeps its own position (a store worker) says where it resumes: that is the truth.

        Behind the group's floor after the store lost its last commits, or at 1 for a rebuilt store: the
        group rewinds and redelivers. Ahead of it (acks the broker lost): it skips what is already applied.
        """
        start = max(1, start)
        if start == group.next_seq and not group.inflight and not group.redeliver:
            return
        log.info("group.repositioned", group=group.name, from_seq=start, was=group.floor + 1)
        group.next_seq = start
        group.inflight.clear()
        group.redeliver.clear()
        group.attempts.clear()
        self._groups_dirty = True

    def _leave(self, client: Client, name: str) -> None:
        group = self.groups.get(name)
        client.groups.discard(name)
        if group is not None and client.rid in group.members:
            del group.members[client.rid]
            self._requeue_member(group, client.rid, "member left")

    def _ack(self, client: Client, name: str, seqs: list[int]) -> None:
        group = self.groups.get(name)
        if group is None:
            return
        credit_back = 0
        for seq in seqs:
            infl = group.inflight.get(seq)
            if infl is not None and infl.rid == client.rid:
                del group.inflight[seq]
                group.attempts.pop(seq, None)
                credit_back += 1
        if client.rid in group.members:
            group.members[client.rid] += credit_back
        self._groups_dirty = True

    def _nack(self, client: Client, name: str, items: list[tuple[int, str, float]]) -> None:
        group = self.groups.get(name)
        if group is None:
            return
        now = time.monotonic()
        for seq, reason, delay in items:
            infl = group.inflight.get(seq)
            if infl is None or infl.rid != client.rid:
                continue
            del group.inflight[seq]
            if client.rid in group.members:
                group.members[client.rid] += 1
            # NaN would break the redelivery heap's order, and an endless delay hold the group's floor for good
            wait = min(max(delay, 0.0), P.MAX_NACK_DELAY_S) if delay == delay else 0.0
            self._retry_or_dead_letter(group, seq, reason[:P.REASON_MAX], now + wait)

    def _touch(self, client: Client, name: str) -> None:
        """The member is still working on what it holds: its messages in flight get a new ack deadline, so a live
        worker that waits for its disk is neither redelivered to nor dead-lettered."""
        group = self.groups.get(name)
        if group is None:
            return
        deadline = time.monotonic() + group.ack_timeout
        for infl in group.inflight.values():
            if infl.rid == client.rid:
                infl.deadline = deadline

    def _retry_or_dead_letter(self, group: Group, seq: int, reason: str, due: float) -> None:
        attempts = group.attempts.get(seq, 1)
        if attempts >= group.max_attempts:
            self._dead_letter(group, seq, attempts, reason)
            return
        group.attempts[seq] = attempts
        heapq.heappush(group.redeliver, (due, seq))

    def _dead_letter(self, group: Group, seq: int, attempts: int, reason: str) -> None:
        group.attempts.pop(seq, None)
        group.dead_letters += 1
        self._groups_dirty = True
        record = self.log.get(seq)
        env = decode_envelope(record.body) if record else None
        payload = {"group": group.name, "seq": seq, "topic": env.topic if env else "",
                   "message_id": env.id if env else "", "attempts": attempts, "reason": reason}
        cid = env.correlation_id if env else ""
        log.warning("message.dead_lettered", group=group.name, seq=seq, topic=payload["topic"],
                    correlation_id=cid, reason=reason)
        self.publish_internal(P.DEAD_LETTER_TOPIC, payload, correlation_id=cid,
                              causation_id=env.id if env else "")
        if env is not None and env.reply_to and env.topic.endswith(".request"):
            failed = reply_topics(env.topic)[1]
            err = {"code": "dead_letter", "message": f"gave up after {attempts} attempts: {reason}",
                   "fields": {"topic": env.topic, "group": group.name, "seq": seq}}
            self.publish_internal(failed, err, correlation_id=env.correlation_id, recipient=env.reply_to,
                                  causation_id=env.id)

    def _requeue_member(self, group: Group, rid: bytes, reason: str) -> None:
        now = time.monotonic()
        for seq in [s for s, inf in group.inflight.items() if inf.rid == rid]:
            del group.inflight[seq]
            self._retry_or_dead_letter(group, seq, reason, now)

    def _pump_groups(self) -> bool:
        """Hands out what each group's members have credit for; True if one stopped at its byte budget."""
        more = False
        for group in self.groups.values():
            if group.members and self._pump(group):
                more = True
        return more

    def _pump(self, group: Group) -> bool:
        credit = sum(group.members.values())
        if credit <= 0:
            return False
        now = time.monotonic()
        picked: list[tuple[int, bytes | None]] = []
        while group.redeliver and group.redeliver[0][0] <= now and len(picked) < credit:
            _, seq = heapq.heappop(group.redeliver)
            picked.append((seq, None))
        scanned = size = 0
        if len(picked) < credit and self.tail.covers(group.next_seq):
            for seq, topic, body in self.tail.scan(group.next_seq, _SCAN_BUDGET):
                scanned += 1
                group.next_seq = seq + 1
                if group.matches(topic):
                    picked.append((seq, body))
                    size += len(body)
                    if len(picked) >= credit or size >= _PICK_BYTES:
                        break
        elif len(picked) < credit and group.next_seq <= self.log.head:
            for seq, topic, raw in self.log.topic_scan(group.next_seq, _SCAN_BUDGET):
                scanned += 1
                group.next_seq = seq + 1
                if group.matches(topic):
                    picked.append((seq, body := self.log.body_of(seq, raw)))
                    size += len(body)
                    if len(picked) >= credit or size >= _PICK_BYTES:
                        break
        if scanned:
            self._groups_dirty = True
        if not picked:
            return False
        self._hand_out(group, picked, now)
        return size >= _PICK_BYTES

    def _hand_out(self, group: Group, picked: list[tuple[int, bytes | None]], now: float) -> None:
        """Splits ``picked`` evenly over the members with credit, one DELIVER frame each.

        A first delivery leaves ``attempts`` alone (absent means one): only redeliveries write to it.
        """
        members = [(rid, c) for rid, c in group.members.items() if c > 0]
        inflight, attempts, name = group.inflight, group.attempts, group.name.encode()
        start = 0
        for n, (rid, credit) in enumerate(members):
            if start >= len(picked):
                break
            share = -(-(len(picked) - start) // (len(members) - n))
            chunk = picked[start:start + min(credit, share)]
            start += len(chunk)
            entry = Inflight(rid, now + group.ack_timeout)
            seqs: list[int] = []
            items: list[Any] = []
            for seq, known in chunk:
                if known is None:
                    rec = self.log.get(seq)
                    if rec is None:
                        continue
                    known = rec.body
                attempt = attempts.get(seq, 0) + 1
                if attempt > 1:
                    attempts[seq] = attempt
                inflight[seq] = entry
                seqs.append(seq)
                items.append([attempt, _Raw(known)])
            if not items:
                continue
            outcome = self._try_send(rid, P.DELIVER, name, P.pack(items))
            if outcome == "sent":
                group.members[rid] = credit - len(items)
                group.delivered += len(items)
                continue
            # Not delivered: not an attempt. Put them back first in line, in order.
            for seq in seqs:
                del inflight[seq]
                if seq in attempts:
                    attempts[seq] -= 1
                heapq.heappush(group.redeliver, (now, seq))
            if outcome == "gone":
                client = self.clients.get(rid)
                if client is not None:
                    self._drop_client(client, "gone")
            elif rid in group.members:
                group.members[rid] = 0  # paused until its acks hand credit back

    # -- timers ----------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        for client in list(self.clients.values()):
            if now - client.last_seen > self.settings.client_timeout_s:
                self._drop_client(client, "missed heartbeats")
        for group in self.groups.values():
            expired = [s for s, inf in group.inflight.items() if inf.deadline <= now]
            for seq in expired:
                inf = group.inflight.pop(seq)
                if inf.rid in group.members:
                    group.members[inf.rid] += 1
                self._retry_or_dead_letter(group, seq, "ack timeout", now)
        if self._groups_dirty:
            self._save_groups()
        self._coverage_heartbeat()
        if now - self._permissions_read >= 1.0:
            self._permissions_read = now
            self.permissions.refresh()
            self._cut_off_revoked()
        self._failed_handshakes()

    def _failed_handshakes(self) -> None:
        """A client without CurveZMQ (or speaking another protocol) gets no answer at all: ZeroMQ ends its
        connection in the handshake. The operator at least sees it here and in ``status``."""
        while True:
            try:
                event = parse_monitor_message(self._handshakes.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.counters["handshakes_failed"] += 1
            log.warning("client.handshake_failed", endpoint=str(event.get("endpoint", b""), errors="replace"),
                        code=hex(int(event.get("value", 0))),
                        reason="not a CurveZMQ client of this broker (a plain socket, or another protocol)")

    def _cut_off_revoked(self) -> None:
        """A module whose key left the allow-list (``membus modules revoke``) loses its clients now: CurveZMQ
        authenticates a connection once, so it would otherwise go on until the connection ended."""
        self._allowed = self.auth.allowed_names()
        for client in list(self.clients.values()):
            if client.source not in self._allowed:
                self._refuse_revoked(client.rid, client.source)
                self._drop_client(client, "revoked", requeue=True)

    def _refuse_revoked(self, rid: bytes, source: str) -> None:
        self.counters["revoked"] += 1
        log.warning("client.revoked", source=source)
        self._error(rid, b"", "not_authorized", f"module {source!r} is no longer on this broker's allow-list "
                                                f"(its key was revoked)", module=source)

    def _coverage_heartbeat(self) -> None:
        head = self.log.head
        for client in self.clients.values():
            for sub in client.subs.values():
                if sub.covered >= head and not sub.gap:
                    continue
                # After a drop, an empty range that starts past the head tells the client where its gap ends.
                first = head + 1 if sub.gap else sub.covered + 1
                if self._send(client.rid, P.LIVE, sub.sub_id, P.pack([first, head, []])):
                    sub.covered, sub.gap = head, False

    def _dirty_group_states(self) -> dict[str, dict[str, Any]]:
        out = {}
        for g in self.groups.values():
            if g.floor != g.saved_floor:
                out[g.name] = g.state()
        return out

    def _save_groups(self) -> None:
        """Group positions ride along with the next commit; with nothing to publish, they are a commit alone."""
        self._groups_dirty = False
        states = self._dirty_group_states()
        if states:
            batch = self.log.prepare([], groups=states)
            self._committing.append((batch, []))
            self.writer.submit(batch)

    def _drop_client(self, client: Client, reason: str, *, requeue: bool = True) -> None:
        self.clients.pop(client.rid, None)
        if client.inbox and self.inboxes.get(client.inbox) == client.rid:
            del self.inboxes[client.inbox]
        for name in client.groups:
            group = self.groups.get(name)
            if group is not None and group.members.pop(client.rid, None) is not None:
                if requeue:
                    self._requeue_member(group, client.rid, reason)
                else:
                    for seq in [s for s, inf in group.inflight.items() if inf.rid == client.rid]:
                        del group.inflight[seq]
                        heapq.heappush(group.redeliver, (0.0, seq))
        log.info("client.dropped", client=client.name, source=client.source, reason=reason)

    # -- replay and status -----------------------------------------------------------------------

    def _replay(self, client: Client, req_id: bytes, body: dict[str, Any]) -> None:
        patterns = [check_pattern(str(p)) for p in body.get("patterns") or ()]
        self._require_subscribe(client, patterns)
        records, next_seq, done = self.log.read(
            from_seq=int(body.get("from_seq") or 1), to_seq=body.get("to_seq"), patterns=patterns,
            since_ns=body.get("since_ns"), until_ns=body.get("until_ns"),
            correlation_id=str(body.get("correlation_id") or ""), limit=min(int(body.get("limit") or 1000), 5000))
        self._send(client.rid, P.REPLAYED, req_id, P.pack([next_seq, done, [_raw(r) for r in records]]))

    def _resend_replies(self, client: Client, requests: list[tuple[str, str]]) -> None:
        """Replies logged while a client was away (its inbox unknown to this broker, or dropped for silence) are
        looked up in the log for the requests it still awaits, and sent to its inbox now."""
        if len(requests) > P.MAX_REPLIES_ASKED:
            raise ValueError(f"at most {P.MAX_REPLIES_ASKED} requests per REPLIES, got {len(requests)}")
        if not client.inbox:
            return
        found: list[msgspec.Raw] = []
        for request_id, correlation_id in requests:
            for rec in self.log.traced_after(request_id, correlation_id):
                if rec.topic.endswith(_REPLY_SUFFIXES):
                    env = decode_envelope(rec.body)
                    if env.causation_id == request_id and env.recipient == client.inbox:
                        found.append(_raw(rec))
        if found:
            self.counters["replies_resent"] += len(found)
            log.info("client.replies_resent", client=client.name, count=len(found))
            self._send(client.rid, P.INBOX, P.pack(found))

    def status(self) -> dict[str, Any]:
        head = self.log.head
        groups = {}
        for g in self.groups.values():
            floor = g.floor
            groups[g.name] = {"patterns": list(g.patterns), "owner": g.owner, "acked": floor, "next": g.next_seq,
                              "lag": head - floor, "inflight": len(g.inflight),
                              "redelivery_pending": len(g.redeliver), "members": len(g.members),
                              "delivered": g.delivered, "dead_letters": g.dead_letters,
                              "ack_timeout_s": g.ack_timeout}
        clients = [{"name": c.name, "source": c.source, "subs": len(c.subs), "groups": sorted(c.groups),
                    "idle_s": round(time.monotonic() - c.last_seen, 2)} for c in self.clients.values()]
        counters = dict(self.counters)
        counters["auth_rejected"] = self.auth.rejected
        return {"broker": self.broker_id, "endpoint": self.endpoint, "pid": os.getpid(), "head": head,
                "log": self.log.stats(), "groups": groups, "clients": clients, "counters": counters,
                "permissions_error": self.permissions.error}


_REPLY_SUFFIXES = ("." + COMPLETE, "." + FAILED)
_payload_of = operator.attrgetter("payload")
_source_of = operator.attrgetter("source")
_topic_of = operator.attrgetter("topic")
_id_of = operator.attrgetter("id")


def _proto(hello: dict[str, Any]) -> int:
    proto = hello.get("proto", 1)
    return proto if isinstance(proto, int) else 1


def _raw(record: Record) -> msgspec.Raw:
    return msgspec.Raw(record.body)


def _more_open_files() -> None:
    """Every client connection is a file descriptor: the broker takes the hard limit (as Go programs do at start)
    instead of the default soft one, often 1024, past which it stops accepting connections without a word."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):  # macOS caps it lower (kern.maxfilesperproc)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run(home: Path | str | None = None, *, settings: Settings | None = None) -> None:
    """Runs a broker in this process until SIGTERM or SIGINT."""
    _more_open_files()
    broker = Broker(Home(home), settings)
    broker.start()
    log.info("broker.heap_frozen", objects=freeze_startup_heap())

    def _stop(signum: int, _frame: Any) -> None:
        log.info("broker.signal", signal=signum)
        broker.stop()

    signal.signal(signal.SIGTERM, _stop)
    if not supervised():  # under `membus up`, Ctrl-C is the supervisor's (bus/supervisor.py)
        signal.signal(signal.SIGINT, _stop)
    try:
        broker.serve_forever()
    finally:
        broker.close()
        thaw_heap()
