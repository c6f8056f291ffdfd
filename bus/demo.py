"""`membus demo`: a short conversation played through every store, shown step by step.

It uses the membus running on the home (``membus up``) when there is one; otherwise it starts one in a
temporary home, and stops and deletes it at the end. Every step checks its answers: the demo returns
True only if all of them worked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from bus.client import Bus
from bus.home import Home
from contracts.catalog import load_all
from contracts.errors import BusError
from contracts.ids import new_id

STORES = ("libsql", "lmdb", "chroma", "duckdb")
CONVERSATION = [
    ("user", "Hi! I just got back from a hiking trip in the Alps.", 0.8),
    ("assistant", "That sounds wonderful! How was the weather up there?", 0.6),
    ("user", "Sunny all week, but my knees hurt on the way down.", -0.2),
    ("assistant", "Walking poles help a lot on long descents. Shall I remind you next time?", 0.4),
]
FACTS = ["Loves hiking in the mountains", "Has sore knees on long descents", "Prefers green tea over coffee"]
QUERY = "outdoor activities in the mountains"


class StepFailed(Exception):
    pass


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise StepFailed(what)


@dataclass
class Demo:
    bus: Bus
    user: str
    conversation: str
    hiking_fact: str = ""
    hiking_correlation: str = ""
    started: float = field(default_factory=time.time)

    def ask(self, topic: str, payload: dict[str, Any]) -> Any:
        return self.bus.request(topic, payload, timeout=60.0)

    # -- the steps --------------------------------------------------------------------------------

    def conversation_step(self) -> Any:
        t = Table("role", "message", "sentiment", box=None, padding=(0, 1))
        ids = []
        for role, text, sentiment in CONVERSATION:
            reply = self.ask("conversation.message.append.request",
                             {"conversation_id": self.conversation, "user_id": self.user, "role": role,
                              "text": text, "sentiment": sentiment}).payload
            ids.append(reply.message_id)
            t.add_row(f"[bold]{role}[/]", text, f"{sentiment:+.1f}")
        recent = self.ask("working.recent.request", {"conversation_id": self.conversation}).payload
        history = self.ask("conversation.history.request", {"conversation_id": self.conversation}).payload
        days = self.ask("analytics.messages_per_day.request", {"conversation_id": self.conversation}).payload
        counted = sum(d.messages for d in days.days)
        expect([m.message_id for m in recent.messages] == ids, "working memory does not hold the 4 messages")
        expect(history.total == len(ids), f"history holds {history.total} messages, not {len(ids)}")
        expect(counted == len(ids), f"analytics counted {counted} messages, not {len(ids)}")
        where = Table(box=None, padding=(0, 1), show_header=False)
        where.add_row("[cyan]LMDB[/] working memory", f"{len(recent.messages)} recent messages")
        where.add_row("[cyan]libSQL[/] history", f"{history.total} messages stored")
        where.add_row("[cyan]DuckDB[/] analytics", f"{counted} messages counted in this conversation")
        return Group(t, Text(""), where)

    def facts_step(self) -> Any:
        stored = []
        for text in FACTS:
            reply = self.ask("memory.store.request", {"user_id": self.user, "text": text})
            stored.append(reply.payload.fact_id)
            if text.startswith("Loves hiking"):
                self.hiking_fact, self.hiking_correlation = reply.payload.fact_id, reply.correlation_id
        hits = self.ask("memory.search.hybrid.request", {"query": QUERY, "user_id": self.user, "k": 3}).payload.hits
        expect(bool(hits), "hybrid search found nothing")
        expect(hits[0].id == self.hiking_fact, f"hybrid search ranked {hits[0].text!r} first")
        t = Table("rank", "fact", "semantic", "bm25", "fused", box=None, padding=(0, 1))
        for rank, hit in enumerate(hits, 1):
            t.add_row(str(rank), hit.text, _num(hit.semantic), _num(hit.bm25), f"{hit.score:.4f}")
        facts = Text.assemble(("stored in libSQL, indexed by Chroma: ", "dim"), "; ".join(FACTS))
        return Group(facts, Text(""), Text.assemble(("hybrid search: ", "bold"), f"“{QUERY}”"), t)

    def analytics_step(self) -> Any:
        mood = self.ask("analytics.sentiment.request", {"conversation_id": self.conversation}).payload
        latency = self.ask("analytics.latency.request",
                           {"topic": "memory.store.request", "since": self.started}).payload
        expect(mood.messages == len(CONVERSATION), f"sentiment over {mood.messages} messages")
        average = sum(s for _, _, s in CONVERSATION) / len(CONVERSATION)
        expect(mood.average is not None and abs(mood.average - average) < 1e-6, "unexpected average sentiment")
        expect(bool(latency.rows) and sum(r.replies for r in latency.rows) >= len(FACTS),
               "latency of memory.store.request not measured")
        t = Table("request", "worker", "replies", "p50 ms", "p95 ms", box=None, padding=(0, 1))
        for r in latency.rows:
            t.add_row(r.topic, r.worker, str(r.replies), f"{r.p50_ms:.1f}", f"{r.percentile_ms:.1f}")
        return Group(Text.assemble(("average sentiment of the conversation: ", "bold"), f"{mood.average:+.2f}",
                                   (f" over {mood.messages} messages", "dim")), Text(""), t)

    def trace_step(self) -> Any:
        trace = list(self.bus.replay(correlation_id=self.hiking_correlation))
        topics = [m.topic for m in trace]
        for needed in ("memory.store.request", "memory.fact.changed", "memory.store.complete"):
            expect(needed in topics, f"the trace has no {needed}")
        t = Table("seq", "topic", "from", box=None, padding=(0, 1))
        for m in trace:
            t.add_row(str(m.seq), m.topic, m.source)
        return Group(Text.assemble(("replayed from the log: ", "bold"), f"correlation {self.hiking_correlation}"),
                     t)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# -- finding or starting membus -----------------------------------------------------------------------------


def ready(bus: Bus) -> list[str]:
    """The stores whose workers have joined their groups."""
    groups = bus.status()["groups"]
    return [s for s in STORES if groups.get(s, {}).get("members")]


def running_bus(home: Home) -> Bus | None:
    """A connection to the broker of ``home`` if one runs there."""
    run = home.read_run_file()
    if not run:
        return None
    try:
        os.kill(int(run.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError, PermissionError, OverflowError):
        return None
    try:
        bus = Bus.connect(home.path, module="demo", timeout=5.0)
        bus.status()
        return bus
    except BusError:
        return None


@contextlib.contextmanager
def cleaned_up_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo through its ``finally`` blocks: their default action would end it at once,
    leaving the membus it started running in a temporary home nobody knows about."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second signal does not cut the cleanup short
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def temporary_membus(console: Console, timeout: float = 180.0) -> Iterator[Bus]:
    """``membus up`` in a temporary home, stopped and deleted afterwards."""
    with cleaned_up_on_termination():
        yield from _temporary_membus(console, timeout)


def _temporary_membus(console: Console, timeout: float) -> Iterator[Bus]:
    folder = Path(tempfile.mkdtemp(prefix="membus-demo-"))
    home = Home(folder / "home")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "ANONYMIZED_TELEMETRY": "False", "MEMBUS_LOG_JSON": "1"}
    with open(folder / "membus.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bus", "up", "--home", str(home.path)],
                                stdout=log, stderr=log, env=env)
    bus: Bus | None = None
    try:
        with console.status("starting membus (broker and four store workers; the embedding model loads)"):
            deadline = time.monotonic() + timeout
            while bus is None or len(ready(bus)) < len(STORES):
                if proc.poll() is not None:
                    raise StepFailed(f"membus up exited with {proc.returncode}: "
                                     f"{(folder / 'membus.log').read_text(errors='replace')[-800:]}")
                if time.monotonic() > deadline:
                    raise StepFailed("membus did not start in time")
                if bus is None:
                    bus = running_bus(home)
                time.sleep(0.3)
        yield bus
    finally:
        if bus is not None:
            bus.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def run(home: Path | None, console: Console) -> bool:
    """Plays the demo; True when every step worked."""
    load_all()
    h = Home(home)
    bus = running_bus(h)
    if bus is not None:
        console.print(f"Using the membus running on [bold]{h.path}[/] (demo data goes under a fresh user id).")
        holder: contextlib.AbstractContextManager[Bus] = contextlib.closing(bus)
    else:
        console.print("No membus runs on this home: starting one in a [bold]temporary home[/], "
                      "removed when the demo ends.")
        holder = temporary_membus(console)
    try:
        with holder as b:
            return play(Demo(b, user=f"demo-user-{new_id()[-8:].lower()}", conversation=f"demo-{new_id()}"),
                        console, ready(b))
    except StepFailed as exc:
        console.print(f"[bold red]✗[/] {exc}")
        return False


def play(demo: Demo, console: Console, present: list[str]) -> bool:
    missing = [s for s in STORES if s not in present]
    if missing:
        console.print(f"[bold red]✗[/] no worker runs for: {', '.join(missing)} (start them with `membus up`)")
        return False
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("A conversation: into working memory, history and analytics", demo.conversation_step),
        ("Facts: stored, then found by hybrid search", demo.facts_step),
        ("Analytics: questions over what happened", demo.analytics_step),
        ("The trace of one request, replayed from the log", demo.trace_step),
    ]
    ok = True
    for n, (title, step) in enumerate(steps, 1):
        try:
            body = step()
            console.print(Panel(body, title=f"[bold]{n} · {title}[/]", title_align="left", border_style="green"))
        except (StepFailed, BusError) as exc:
            message = exc.message if isinstance(exc, BusError) else str(exc)
            console.print(Panel(Text(message, style="red"), title=f"[bold]{n} · {title}[/]", title_align="left",
                                border_style="red"))
            ok = False
            if n == 2:
                break  # the trace step follows the fact stored here
    console.print("[bold green]✓ every step worked[/]" if ok else "[bold red]✗ the demo did not complete[/]")
    return ok
