"""Cross-store consistency: `membus check` and `membus rebuild STORE`, usable from Python.

**check** waits until every running store worker has applied the log up to its head, then compares
the stores over request/reply (``*.inventory.request``; never by opening another worker's files).
libSQL is the source of truth: its current facts must be indexed in Chroma, its messages counted in
DuckDB and indexed in Chroma's conversation collection, and its recent unexpired messages held in
LMDB working memory. Requests are applied in log order, so the derived stores, asked after libSQL
answered, have seen every change event of what libSQL listed; an id that only looks extra (written
in between) is confirmed against a second libSQL listing before it is reported.

**rebuild** coordinates with whoever runs the worker through two files in ``<home>/run``:

* ``worker-NAME.lock``: every worker process holds an exclusive ``flock`` on it while its store is
  open (``hold_store``, called by ``workers.runtime.run``). The kernel drops it when the process dies,
  even by kill -9, so holding it proves no other process has the store open.
* ``rebuild-NAME``: the pid of a running rebuild. A worker starting while it names a live process
  waits (it does not exit, so ``membus up`` does not spin through restarts); a stale one is ignored.

Rebuild writes the flag, stops the worker (SIGTERM to the lock holder) and takes the lock, wipes the
store (``Backend.wipe``), runs the worker in this process from position 0 until its group has applied
the whole log, then releases both: under ``membus up`` the restarted worker, which was waiting, takes
over from the rebuilt position, and ``membus rebuild`` returns once it has (``wait_for_takeover``; a
worker's status names the ``membus up`` that runs it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bus.filelock import try_lock, unlock
from bus.home import Home
from contracts.catalog import load_all
from contracts.errors import BusError, NotAuthorized, StoreError, TimeoutError
from contracts.inventory import InventoryItem

log = structlog.get_logger("membus.consistency")

STORES = ("libsql", "lmdb", "chroma", "duckdb")
INVENTORY_TOPICS = {"libsql": "structured.inventory.request", "lmdb": "working.inventory.request",
                    "chroma": "semantic.inventory.request", "duckdb": "analytics.inventory.request"}
CHANGE_IDS = {"memory.fact.changed": ("facts", "fact_id"),
              "conversation.message.changed": ("messages", "message_id"),
              "feedback.event.changed": ("feedback", "event_id")}
"""Change events of the structured store: the kind and id of what each one carries."""
EXPIRY_MARGIN_S = 60.0
"""Working-memory messages expiring sooner than this are not expected (they may be gone when asked)."""
SAMPLE = 20


# -- the report -----------------------------------------------------------------------------------------


@dataclass
class StoreState:
    name: str
    running: bool
    pid: int | None
    position: int | None
    """The last log seq the store applied (its worker's status file)."""
    acked: int
    """Every seq at or below it is applied (the broker's view of the group)."""
    lag: int
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Difference:
    store: str
    kind: str
    problem: str
    """missing | extra | stale | not applied | lagging | not running | unanswered"""
    count: int
    ids: list[str] = field(default_factory=list)
    """The first ones, sorted."""
    detail: str = ""

    def describe(self) -> str:
        shown = ", ".join(self.ids[:5]) + (", ..." if self.count > 5 else "")
        text = f"{self.store}: {self.count} {self.kind} {self.problem}"
        if self.detail:
            text += f" ({self.detail})"
        return text + (f": {shown}" if self.ids else "")


@dataclass
class CheckReport:
    head: int
    settled: bool
    """Every running store reached the log head before the timeout."""
    stores: list[StoreState]
    differences: list[Difference]

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}


def _difference(store: str, kind: str, problem: str, ids: Iterable[str], detail: str = "") -> Difference | None:
    found = sorted(ids)
    return Difference(store, kind, problem, len(found), found[:SAMPLE], detail) if found else None


# -- waiting for the stores -----------------------------------------------------------------------------


def store_groups(status: dict[str, Any]) -> list[str]:
    """The store workers the broker knows a consumer group of, in check order."""
    return [name for name in STORES if name in status["groups"]]


def settle(bus: Any, stores: list[str], timeout: float) -> tuple[bool, dict[str, Any]]:
    """Waits until every running store has applied the whole log, and the log stopped growing from it.

    A store applying the log publishes change events that others follow, so the target moves to the
    head again until a round adds nothing. Stores without a running worker are not waited for.
    Returns (settled, the last broker status).
    """
    deadline = time.monotonic() + timeout
    status = bus.status()
    target = status["head"]
    while True:
        groups = status["groups"]
        behind = [n for n in stores if groups[n]["members"]
                  and (groups[n]["acked"] < target or groups[n]["inflight"] or groups[n]["redelivery_pending"])]
        if not behind:
            if status["head"] == target:
                return True, status
            target = status["head"]
            continue
        if time.monotonic() >= deadline:
            return False, status
        time.sleep(0.1)
        status = bus.status()


# -- asking the stores ----------------------------------------------------------------------------------


def inventory(bus: Any, store: str, kind: str, *, timeout: float) -> tuple[list[InventoryItem], dict[str, float]]:
    """Every item of ``kind`` the store holds, page by page."""
    items: list[InventoryItem] = []
    info: dict[str, float] = {}
    cursor = ""
    while True:
        page = bus.request(INVENTORY_TOPICS[store], {"kind": kind, "cursor": cursor}, timeout=timeout).payload
        items.extend(page.items)
        info = dict(page.info)
        cursor = page.cursor
        if not cursor:
            return items, info


def pending_changes(bus: Any, store: str, after: int, patterns: Iterable[str]) -> dict[str, set[str]]:
    """Ids (by kind) in the structured store's change events the store has not applied yet."""
    out: dict[str, set[str]] = {}
    for topic, (kind, key) in CHANGE_IDS.items():
        if topic not in patterns:
            continue
        for msg in bus.replay(topic=topic, from_seq=after + 1):
            payload = msg.to_dict().get("payload") or {}
            if isinstance(payload, dict) and payload.get(key):
                out.setdefault(kind, set()).add(str(payload[key]))
    return out


# -- the comparison -------------------------------------------------------------------------------------


@dataclass
class Truth:
    """What the structured store (libSQL) holds."""

    facts: dict[str, InventoryItem]
    messages: dict[str, InventoryItem]
    feedback: dict[str, InventoryItem]

    @classmethod
    def fetch(cls, bus: Any, timeout: float) -> Truth:
        return cls(*({i.id: i for i in inventory(bus, "libsql", kind, timeout=timeout)[0]}
                     for kind in ("facts", "messages", "feedback")))

    def indexed_facts(self) -> set[str]:
        return {i for i, item in self.facts.items() if item.current and item.has_text}

    def indexed_messages(self) -> set[str]:
        return {i for i, item in self.messages.items() if item.has_text}


def compare(store: str, truth: Truth, held: dict[str, list[InventoryItem]], info: dict[str, float],
            now: float) -> list[Difference]:
    """What ``store`` (its items by kind) lacks or has wrongly, judged against the structured store."""
    out: list[Difference | None] = []
    ids = {kind: {i.id for i in items} for kind, items in held.items()}
    if store == "chroma":
        facts, known_facts = ids["memory"], set(truth.facts)
        out.append(_difference(store, "facts", "missing", truth.indexed_facts() - facts,
                               "current in libsql, not in the memory collection"))
        out.append(_difference(store, "facts", "stale", (facts & known_facts) - truth.indexed_facts(),
                               "superseded in libsql, still indexed"))
        out.append(_difference(store, "messages", "missing", truth.indexed_messages() - ids["conversation"],
                               "in libsql, not in the conversation collection"))
    elif store == "duckdb":
        for kind in ("messages", "facts", "feedback"):
            mine: dict[str, InventoryItem] = getattr(truth, kind)
            out.append(_difference(store, kind, "missing", set(mine) - ids[kind], "in libsql, not counted"))
            out.append(_difference(store, kind, "extra", ids[kind] - set(mine), "counted, not in libsql"))
        removed = {i.id for i in held["facts"] if not i.current}
        out.append(_difference(store, "facts", "stale",
                               {i for i in removed ^ {i for i, f in truth.facts.items() if not f.current}
                                if i in truth.facts and i in ids["facts"]},
                               "superseded in one store only"))
    elif store == "lmdb":
        cleared = {i.id: i.ts for i in held.get("cleared", [])}
        expected = expected_in_working_memory(truth, held["messages"], info, now, cleared)
        out.append(_difference(store, "messages", "missing", expected - ids["messages"],
                               "recent in libsql, not in working memory"))
    return [d for d in out if d is not None]


def expected_in_working_memory(truth: Truth, held: list[InventoryItem], info: dict[str, float],
                               now: float, cleared: dict[str, float] | None = None) -> set[str]:
    """The structured store's messages working memory should hold: unexpired, not older than a clear of their
    conversation (``cleared``: conversation -> when), and within its window of ``max_messages`` per
    conversation (a full window holds only what is newer than its oldest message)."""
    ttl = float(info.get("ttl_seconds", 24 * 3600.0))
    window = int(info.get("max_messages", 200))
    by_token: dict[str, list[InventoryItem]] = {}
    for item in held:
        by_token.setdefault(item.group, []).append(item)
    # Working memory names a conversation by an opaque token: a held message of it gives its id.
    by_conversation = {truth.messages[item.id].group: by_token[item.group]
                       for item in held if item.id in truth.messages}
    expected = set()
    for item in truth.messages.values():
        if item.ts + ttl <= now + EXPIRY_MARGIN_S or (cleared and item.ts <= cleared.get(item.group, -1.0)):
            continue
        mine = by_conversation.get(item.group, [])
        if len(mine) >= window and item.ts < min(m.ts for m in mine):
            continue
        expected.add(item.id)
    return expected


def _status_files_since(home: Home, names: list[str], since: float, wait: float = 3.0) -> dict[str, dict[str, Any]]:
    """The workers' status files, once each of ``names`` has written its own after ``since`` (a running worker
    writes one at least every ~1.5 s), or after ``wait`` s: a file from before the log settled shows an older
    position, such as 0 just after a first burst of traffic."""
    from workers.runtime import read_worker_status

    deadline = time.monotonic() + wait
    while True:
        workers = read_worker_status(home)
        if all(float(workers.get(n, {}).get("updated", 0)) >= since for n in names) or time.monotonic() > deadline:
            return workers
        time.sleep(0.1)


KINDS = {"lmdb": ("messages", "cleared"), "chroma": ("memory", "conversation"),
         "duckdb": ("messages", "facts", "feedback")}


def check(bus: Any, home: Home, *, timeout: float = 30.0) -> CheckReport:
    """Waits (up to ``timeout``) for the stores to catch up, then compares them. Never raises for a
    store that is stopped or does not answer: that is a difference in the report."""
    load_all()  # replies decode into their contracts
    started = time.monotonic()
    stores = store_groups(bus.status())
    settled, status = settle(bus, stores, timeout)
    workers = _status_files_since(home, [n for n in stores if status["groups"][n]["members"]], time.time())
    differences: list[Difference] = []
    states: dict[str, StoreState] = {}
    for name in stores:
        g = status["groups"][name]
        w = workers.get(name, {})
        states[name] = StoreState(name, bool(g["members"]), w.get("pid") if g["members"] else None,
                                  w.get("position"), int(g["acked"]), int(status["head"]) - int(g["acked"]))
    if states and "libsql" not in states:
        differences.append(Difference("libsql", "store", "not running", 0, [],
                                      "no structured store: nothing to compare the other stores with"))
    answering = []
    for name, state in states.items():
        if state.lag > 0:
            pending = pending_changes(bus, name, state.acked, status["groups"][name]["patterns"])
            differences.append(Difference(name, "log", "lagging" if state.running else "not running",
                                          state.lag, [], f"{state.lag} log messages not applied"))
            differences += [d for kind, ids in sorted(pending.items())
                            if (d := _difference(name, kind, "not applied", ids, "changes waiting in the log"))]
        elif state.running:
            answering.append(name)
        else:
            differences.append(Difference(name, "store", "not running", 0, [], "no worker to ask"))

    def left() -> float:
        return max(5.0, timeout - (time.monotonic() - started))

    truth: Truth | None = None
    if "libsql" in answering:
        try:
            truth = Truth.fetch(bus, left())
            states["libsql"].counts = {"facts": len(truth.facts), "messages": len(truth.messages),
                                       "feedback": len(truth.feedback)}
        except NotAuthorized:  # this module may not ask: nothing is known of the store
            raise
        except BusError as exc:
            differences.append(Difference("libsql", "inventory", "unanswered", 0, [], exc.message))
    found: list[Difference] = []
    for name in (n for n in answering if n != "libsql"):
        try:
            held: dict[str, list[InventoryItem]] = {}
            info: dict[str, float] = {}
            for kind in KINDS.get(name, ()):
                held[kind], info = inventory(bus, name, kind, timeout=left())
        except NotAuthorized:
            raise
        except BusError as exc:
            differences.append(Difference(name, "inventory", "unanswered", 0, [], exc.message))
            continue
        states[name].counts = {kind: len(items) for kind, items in held.items()}
        if truth is not None:
            found += compare(name, truth, held, info, time.time())
    if found and truth is not None:
        found = confirm(bus, found, left(), truth)
    return CheckReport(int(status["head"]), settled, list(states.values()), differences + found)


def confirm(bus: Any, found: list[Difference], timeout: float, first: Truth | None = None) -> list[Difference]:
    """Drops what a later listing of the structured store explains: an "extra" id it now holds (written
    after the first listing), a "missing" fact it has superseded since, a "stale" fact superseded (or made
    current) between the two listings (the other store was listed in between)."""
    later = Truth.fetch(bus, timeout)
    out = []
    for d in found:
        if d.problem == "extra":
            ids = [i for i in d.ids if i not in getattr(later, d.kind)]
        elif d.problem == "missing" and d.kind == "facts":
            ids = [i for i in d.ids if i in later.indexed_facts()]
        elif d.problem == "stale" and d.kind == "facts" and first is not None:
            ids = [i for i in d.ids if i in later.facts and i in first.facts
                   and later.facts[i].current == first.facts[i].current]
        else:
            out.append(d)
            continue
        if ids:
            out.append(Difference(d.store, d.kind, d.problem, d.count - (len(d.ids) - len(ids)), ids, d.detail))
    return out


# -- who may open a store -------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS, Windows): kill(0) said it exists
        return True


def _read_pid(path: Any) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


class StoreLock:
    """An exclusive ``flock`` on ``<home>/run/worker-NAME.lock``, held while a process has the store open.

    The file holds the holder's pid (stale once released: only meaningful while the lock is taken).
    """

    def __init__(self, home: Home, name: str) -> None:
        self.path = home.path / "run" / f"worker-{name}.lock"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # a read-only or full home: one line, not a traceback
            raise StoreError(f"cannot take the store lock {self.path}: {exc.strerror or exc}",
                             path=str(self.path)) from None
        if not try_lock(fd):
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder(self) -> int | None:
        return _read_pid(self.path)

    def release(self) -> None:
        if self._fd is not None:
            unlock(self._fd)
            os.close(self._fd)
            self._fd = None


def rebuild_flag(home: Home, name: str) -> Any:
    return home.path / "run" / f"rebuild-{name}"


def rebuilding(home: Home, name: str) -> bool:
    """Whether a live process is rebuilding the store ``name`` (a flag left by a dead one is ignored)."""
    pid = _read_pid(rebuild_flag(home, name))
    return pid is not None and pid != os.getpid() and pid_alive(pid)


def hold_store(home: Home, name: str, should_stop: Callable[[], bool]) -> StoreLock | None:
    """For a worker process: waits until no rebuild runs and no other process has the store open, then
    holds it. None when ``should_stop`` turned true first."""
    lock = StoreLock(home, name)
    told = False
    while not should_stop():
        if not rebuilding(home, name) and lock.try_acquire():
            if not rebuilding(home, name):
                return lock
            lock.release()
        if not told:
            log.info("worker.waiting_for_store", worker=name, rebuilding=rebuilding(home, name),
                     holder=lock.holder())
            told = True
        time.sleep(0.25)
    return None


# -- rebuild --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    store: str
    phase: str
    """stopping | wiping | replaying | done"""
    position: int = 0
    target: int = 0


@dataclass
class RebuildResult:
    store: str
    position: int
    head: int
    seconds: float
    stopped_pid: int | None
    supervisor: int | None = None
    """The ``membus up`` that ran the stopped worker, if still alive: it starts a new one, which takes over."""


def stop_worker(home: Home, name: str, lock: StoreLock, timeout: float) -> int | None:
    """Stops whichever process has the store open (SIGTERM: it finishes its batch) and takes its lock.
    Returns the pid stopped, if any."""
    deadline = time.monotonic() + timeout
    signalled: int | None = None
    while not lock.try_acquire():
        pid = lock.holder()
        if pid is not None and pid != signalled and pid_alive(pid):
            log.info("rebuild.stopping_worker", worker=name, pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            signalled = pid
        if time.monotonic() > deadline:
            raise StoreError(f"the {name} worker (pid {pid}) did not stop within {timeout:.0f} s",
                             store=name, pid=pid)
        time.sleep(0.1)
    return signalled


def make_runtime(name: str, home: Home) -> Any:
    """The worker runtime, configured as ``workers.runtime.run`` configures it."""
    from workers.runtime import WorkerRuntime, runtime_settings

    extra: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        from bus.sealing import store_keyring

        ring = store_keyring(home.path, name, bool(getattr(home.settings(), "encryption", False)))
        if ring:
            extra["encryption"] = ring
    return WorkerRuntime(name, home, **runtime_settings(), **extra)


def rebuild(bus: Any, home: Home, name: str, *, on_progress: Callable[[Progress], None] = lambda p: None,
            stop_timeout: float = 60.0, timeout: float | None = None) -> RebuildResult:
    """Wipes the store ``name`` and applies the whole log to it again, in this process (see the module
    docstring for how it keeps the worker away meanwhile). Returns once it has applied the log head."""
    from workers.registry import load

    load(name)  # an unknown worker fails here, before anything is touched
    started = time.monotonic()
    flag = rebuild_flag(home, name)
    flag.parent.mkdir(parents=True, exist_ok=True)
    if rebuilding(home, name):
        raise StoreError(f"a rebuild of {name} is already running (pid {_read_pid(flag)})", store=name)
    flag.write_text(str(os.getpid()))
    lock = StoreLock(home, name)
    try:
        on_progress(Progress(name, "stopping"))
        running = _worker_status(home, name)
        stopped = stop_worker(home, name, lock, stop_timeout)
        supervisor = running.get("supervisor") if stopped and running.get("pid") == stopped else None
        on_progress(Progress(name, "wiping"))
        runtime = make_runtime(name, home)
        runtime.backend.wipe()
        log.info("rebuild.wiped", worker=name, path=str(runtime.backend.data_dir))
        position = _replay(bus, runtime, name, on_progress, started, timeout)
        return RebuildResult(name, position, int(bus.status()["head"]), time.monotonic() - started, stopped,
                             supervisor if isinstance(supervisor, int) and pid_alive(supervisor) else None)
    finally:
        lock.release()
        with contextlib.suppress(FileNotFoundError):
            flag.unlink()


def wait_for_takeover(home: Home, result: RebuildResult, timeout: float = 120.0) -> int:
    """After a rebuild under ``membus up``: waits until a new worker process has the store and has written its
    status from the rebuilt position on; returns its pid. (Until then ``membus check`` finds no worker.)"""
    since = time.time()
    deadline = time.monotonic() + timeout
    while True:
        status = _worker_status(home, result.store)
        pid = status.get("pid")
        if (isinstance(pid, int) and pid not in (result.stopped_pid, os.getpid()) and pid_alive(pid)
                and status.get("updated", 0) >= since and int(status.get("position", 0)) >= result.position):
            return pid
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {result.store} worker took over the rebuilt store within {timeout:.0f} s "
                               f"(see `membus status` and the log of `membus up`)", store=result.store)
        time.sleep(0.1)


def _worker_status(home: Home, name: str) -> dict[str, Any]:
    from workers.runtime import read_worker_status

    return read_worker_status(home).get(name, {})


def _replay(bus: Any, runtime: Any, name: str, on_progress: Callable[[Progress], None], started: float,
            timeout: float | None) -> int:
    failure: list[BaseException] = []

    def run() -> None:
        try:
            runtime.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"rebuild-{name}", daemon=True)
    thread.start()
    try:
        joined = False
        while True:
            if failure:
                raise failure[0]
            status = bus.status()
            group = status["groups"].get(name)
            joined = joined or bool(group and group["members"])  # only this process may join: it holds the lock
            position = int(runtime.stats["position"])
            on_progress(Progress(name, "replaying", position, int(status["head"])))
            if joined and group and not group["inflight"] and not group["redelivery_pending"]:
                done, status = settle(bus, [name], 0.0)
                if done:
                    on_progress(Progress(name, "done", int(runtime.stats["position"]), int(status["head"])))
                    return int(runtime.stats["position"])
            if not thread.is_alive():
                raise StoreError(f"the {name} worker stopped during the rebuild", store=name)
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"the rebuild of {name} did not reach the log head in {timeout:.0f} s",
                                   store=name)
            time.sleep(0.2)
    finally:
        runtime.stop()
        thread.join(60.0)
