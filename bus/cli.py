"""The `membus` command. Every command takes --home DIR (env MEMBUS_HOME).

Exit codes: 0 ok, 1 a bus error (printed), 2 usage error, 3 timeout, 4 not authorized.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bus import logs
from bus.home import Home
from contracts.errors import BusError, NotAuthorized, TimeoutError, ValidationError
from contracts.topics import check_pattern, check_topic, matches_any

app = typer.Typer(help="membus: a durable local bus in front of your AI companion's memory stores.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True, soft_wrap=True)
"""Errors stay on one line (a wrapped path cannot be copied or grepped)."""

def _home_folder(path: Path | None) -> Path | None:
    if path is not None and path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file: the home is a folder (it is made if missing)")
    return path


HomeOpt = Annotated[Path | None, typer.Option("--home", envvar="MEMBUS_HOME", help="The membus home folder.",
                                              callback=_home_folder)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.callback()
def _main(home: Annotated[Path | None, typer.Option("--home", help="The membus home folder, for the command that "
                                                    "follows (as `COMMAND --home DIR`).", callback=_home_folder)] = None
          ) -> None:
    """membus: a durable local bus in front of your AI companion's memory stores."""
    if home is not None:  # every command's own --home falls back to MEMBUS_HOME
        os.environ["MEMBUS_HOME"] = str(home)


def _fit(table: Table) -> Table:
    """Keeps every number, name and one-word header whole in a narrow terminal: a column of single words
    shrinks no further than its longest one (rich would otherwise shorten ``1234567`` to ``12345…``), prose
    wraps around them, and no column rules take the room."""
    from rich import box
    from rich.text import Text

    table.box, table.show_edge, table.padding = box.SIMPLE_HEAD, False, (0, 1, 0, 0)
    for column in table.columns:
        cells = [Text.from_markup(c).plain if isinstance(c, str) else "" for c in column.cells]
        head = max((len(w) for w in str(column.header).split()), default=0)
        if any(" " in c for c in cells):  # prose: wraps, and folds a word longer than the room left
            column.overflow, column.min_width = "fold", head
            continue
        column.min_width = column.max_width = max([head, *map(len, cells)])  # the header wraps instead
    return table


def _home(home: Path | None) -> Home:
    return Home(home)


def _known_worker(name: str, what: str = "worker") -> None:
    from workers.registry import backends

    if name not in backends():
        err.print(f"[bold red]error[/]: unknown {what} {name!r}; known: {', '.join(backends())}")
        raise typer.Exit(2)


CONNECT_TIMEOUT_S = 10.0


def _bus(home: Path | None, module: str = "cli") -> Any:
    from bus.client import Bus

    h = _home(home)
    _say_if_waiting(h)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while not h.path.is_dir():  # a mistyped --home is not made into a home (its keys, its run folder)
        if time.monotonic() > deadline:
            err.print(f"[bold red]error[/]: no membus home at {h.path} (start one with `membus up --home ...`)",
                      highlight=False)
            raise typer.Exit(1)
        time.sleep(0.1)
    return Bus.connect(home, module=module, timeout=max(0.1, deadline - time.monotonic()))


def _say_if_waiting(h: Home) -> None:
    """A command run with no broker up waits for one to start (``membus up &`` then a command is fine), so
    the person who forgot to start it is told at once what the wait is for."""
    from bus.consistency import pid_alive

    run = h.read_run_file()
    if run is None:
        err.print(f"membus: no broker is running on {h.path}; waiting {CONNECT_TIMEOUT_S:g} s for one to start "
                  "(`membus up`)", highlight=False)
    elif isinstance(run.get("pid"), int) and not pid_alive(run["pid"]):
        err.print(f"membus: the broker that ran on {h.path} (pid {run['pid']}) has ended; waiting "
                  f"{CONNECT_TIMEOUT_S:g} s for a new one (`membus up`)", highlight=False)


def _topic_arg(value: str) -> str:
    try:
        return check_topic(value)
    except BusError as exc:
        raise typer.BadParameter(exc.message) from None


def _not_empty(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise typer.BadParameter("empty: leave the option out to mean everything")
    return value


def _pattern_arg(value: str | None) -> str | None:
    try:
        return value if value is None else check_pattern(value)
    except BusError as exc:
        raise typer.BadParameter(exc.message) from None


TopicArg = Annotated[str, typer.Argument(callback=_topic_arg)]


def _fail(exc: BusError, who: str = "") -> None:
    err.print(f"[bold red]error[/]: {escape(who)}{': ' if who else ''}{escape(exc.message)}", highlight=False)
    raise typer.Exit(exit_code(exc))


def exit_code(exc: BusError) -> int:
    return 3 if isinstance(exc, TimeoutError) else 4 if isinstance(exc, NotAuthorized) else 1


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
    except (json.JSONDecodeError, ValueError) as exc:
        err.print(f"[bold red]error[/]: {what} is not valid JSON: {exc}")
        raise typer.Exit(2) from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    """A number too large for a float (1e999) would be logged as infinity, as a bare Infinity would."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def _duration_arg(value: str | None) -> str | None:
    if value is not None:
        parse_duration(value)  # a bad one is refused here, where the error names the option
    return value


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise typer.BadParameter(f"{text!r}: use a number and s, m, h or d (e.g. 10m)")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@app.command()
def up(home: HomeOpt = None,
       workers: Annotated[str | None, typer.Option(help="Comma-separated workers (default: all present).")] = None
       ) -> None:
    """Start the broker and every worker; restart what crashes; Ctrl-C stops cleanly."""
    from bus.supervisor import Supervisor
    from workers.registry import available

    logs.configure(process="supervisor")
    h = _home(home)
    if workers:
        names = [w for w in workers.split(",") if w]
    else:
        for name in h.settings().workers:
            _known_worker(name, "worker in the `workers` setting (membus.toml or MEMBUS_WORKERS):")
        names = [w for w in h.settings().workers if w in available()]
    for name in names:
        _known_worker(name)
    err.print(f"membus: home {h.path}, workers: {', '.join(names) or 'none'}")
    try:
        Supervisor(h, names).run()
    except BusError as exc:  # the home cannot be unlocked, or its settings contradict it: say why, no traceback
        _fail(exc)


@app.command()
def broker(home: HomeOpt = None) -> None:
    """Run the broker alone, in the foreground."""
    from bus.broker import run
    from bus.supervisor import follow_supervisor

    logs.configure(process="broker")
    follow_supervisor()
    try:
        run(home)
    except BusError as exc:  # it cannot start (its log is open elsewhere, no room for it): say why, no traceback
        _fail(exc)


@app.command()
def worker(name: str, home: HomeOpt = None) -> None:
    """Run one store worker in the foreground (`membus up` runs them all)."""
    from bus.supervisor import follow_supervisor
    from workers.runtime import run

    _known_worker(name)
    logs.configure(process=f"worker-{name}")
    follow_supervisor()
    try:
        run(name, home)
    except BusError as exc:  # its keys or its store cannot be opened: say why (and which worker), no traceback
        _fail(exc, f"worker {name}")


@app.command()
def publish(topic: TopicArg,
            payload: Annotated[str, typer.Argument(help="The payload as JSON; - reads one per line from stdin.")],
            home: HomeOpt = None, correlation: Annotated[str, typer.Option(help="Correlation id.")] = "",
            timeout: float = 10.0) -> None:
    """Publish a message; prints its sequence number once it is durable.

    With - as the payload, publishes one message per JSON line of stdin (every line is parsed before
    anything is sent) and prints each one's sequence number, in order.
    """
    logs.configure(level="warning")
    if payload == "-":
        if correlation:
            err.print("[bold red]error[/]: --correlation applies to one message, not to lines from stdin")
            raise typer.Exit(2)
        lines = [(n, _parse_json(line, f"line {n} of stdin")) for n, line in enumerate(sys.stdin, start=1)
                 if line.strip()]
        payloads = [p for _, p in lines]
        try:
            with _bus(home) as bus:
                for start in range(0, len(payloads), _STDIN_CHUNK):
                    try:
                        seqs = bus.publish_many(topic, payloads[start:start + _STDIN_CHUNK], timeout=timeout)
                    except ValidationError as exc:  # its index is within the chunk: say which line it was
                        if isinstance(exc.fields.get("index"), int):
                            exc.message = f"line {lines[start + exc.fields['index']][0]} of stdin: {exc.message}"
                        raise
                    typer.echo("\n".join(map(str, seqs)))
        except BusError as exc:
            _fail(exc)
        return
    data = _parse_json(payload, "the payload")
    try:
        with _bus(home) as bus:
            typer.echo(bus.publish(topic, data, correlation_id=correlation, timeout=timeout))
    except BusError as exc:
        _fail(exc)


_STDIN_CHUNK = 10_000
"""Lines of stdin per publish_many call: a huge file is not held in flight at once."""


@app.command()
def request(topic: TopicArg, payload: Annotated[str, typer.Argument(help="The payload as JSON.")],
            home: HomeOpt = None,
            timeout: Annotated[float, typer.Option(min=0.001, help="Seconds to wait for the reply.")] = 10.0) -> None:
    """Send a request and print the reply as JSON."""
    logs.configure(level="warning")
    data = _parse_json(payload, "the payload")
    try:
        with _bus(home) as bus:
            takers = _groups_taking(bus, topic)
            if not takers:
                err.print(f"[yellow]note[/]: no consumer group takes {topic} (no worker handles it, and no module "
                          f"consumes it): nothing may answer; waiting {timeout:g} s anyway", highlight=False)
            elif (unanswered := _no_worker_answers(topic, takers)) is not None:
                err.print(f"[yellow]note[/]: no worker answers {topic}: the workers that take it only record it, and "
                          f"no module's group takes it.{unanswered} Waiting {timeout:g} s anyway.",
                          highlight=False)
            reply = bus.request(topic, data, timeout=timeout)
            typer.echo(json.dumps(reply.to_dict()["payload"], default=str))
    except BusError as exc:
        _fail(exc)


def _restart_note(ws: dict[str, Any]) -> str:
    """What ``membus up`` does about a stopped worker: when it starts it again, and how often it has."""
    sup = ws.get("supervised") or {}
    if sup.get("restart_at") is None:
        return ""
    wait = max(0.0, float(sup["restart_at"]) - time.time())
    return f" (membus up starts it again in {wait:.0f} s; restarted {sup.get('restarts', 0)} times so far)"


def _groups_taking(bus: Any, topic: str) -> list[str]:
    return [name for name, g in bus.status()["groups"].items() if matches_any(tuple(g["patterns"]), topic)]


def _no_worker_answers(topic: str, takers: list[str]) -> str | None:
    """None when some worker answers ``topic`` or a module's group is among its ``takers``; else a sentence
    naming the requests workers answer whose names are closest to it, or where to find them."""
    import difflib

    from contracts.catalog import load_all
    from contracts.registry import all_specs, spec_for
    from workers.registry import backends

    load_all()
    spec = spec_for(topic)
    if spec is not None and spec.handled_by:
        return None
    workers = set(backends())
    if any(name not in workers for name in takers):
        return None
    answered = [s.topic for s in all_specs() if s.handled_by and s.topic.endswith(".request")]
    close = difflib.get_close_matches(topic, answered, n=3, cutoff=0.6)
    if not close:
        return " `membus topics` lists the requests workers answer."
    named = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" Did you mean {named}? (`membus topics` lists them.)"


def json_line(data: Any) -> str:
    """One line of strict JSON: a NaN or infinity that another client logged is written as a string ("NaN"),
    since jq and most parsers refuse the bare words."""
    try:
        return json.dumps(data, default=str, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(data), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _line(msg: Any) -> str:
    d = msg.to_dict()
    when = datetime.fromtimestamp(d["ts"] / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]
    payload = json.dumps(d.get("payload"), default=str, ensure_ascii=False)
    if "payload_error" in d:
        payload = f"(breaks its contract: {d['payload_error']}) {payload}"
    if len(payload) > 160:
        payload = payload[:157] + "..."
    return f"{d['seq']:>8}  {when}  {d['topic']:<36} {d['source']:<14} {d['correlation_id'][-8:]}  {payload}"


@app.command()
def tail(pattern: Annotated[str, typer.Argument(help="Topic pattern, e.g. 'memory.>'", callback=_pattern_arg)] = ">",
         home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Follow live messages."""
    logs.configure(level="warning")
    try:
        with _bus(home) as bus, bus.subscribe(pattern) as sub:
            for msg in sub:
                typer.echo(json_line(msg.to_dict()) if json_out else _line(msg))
    except KeyboardInterrupt:
        pass
    except BusError as exc:
        _fail(exc)


@app.command()
def replay(home: HomeOpt = None,
           topic: Annotated[str | None, typer.Option(help="Topic pattern.", callback=_pattern_arg)] = None,
           from_seq: Annotated[int, typer.Option("--from-seq", min=0, max=2**63 - 1)] = 1,
           to_seq: Annotated[int | None, typer.Option("--to-seq", min=0, max=2**63 - 1)] = None,
           since: Annotated[str | None, typer.Option(help="How far back, by when the broker logged it, e.g. 10m, "
                                                           "2h, 1d (the time shown is the message's own).",
                                                           callback=_duration_arg)] = None,
           correlation: Annotated[str | None, typer.Option(help="Only this correlation id (one trace).",
                                                           callback=_not_empty)] = None,
           json_out: JsonOpt = False) -> None:
    """Print the log: by sequence range, time, topic pattern or correlation id."""
    logs.configure(level="warning")
    since_ts = max(0.0, time.time() - parse_duration(since)) if since else None  # further back than 1970: all
    try:
        with _bus(home) as bus:
            for msg in bus.replay(topic=topic, from_seq=from_seq, to_seq=to_seq, since=since_ts,
                                  correlation_id=correlation):
                typer.echo(json_line(msg.to_dict()) if json_out else _line(msg))
    except BusError as exc:
        _fail(exc)


@app.command()
def status(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Log head, consumer groups (acked, lag, in flight, dead letters), workers, clients."""
    from bus.consistency import pid_alive
    from workers.runtime import read_worker_status

    logs.configure(level="warning")
    try:
        with _bus(home) as bus:
            st = bus.status()
    except BusError as exc:
        _fail(exc)
        return
    st["workers"] = read_worker_status(_home(home))
    supervised = _home(home).supervisor_state().get("children", {})
    for name, ws in st["workers"].items():
        ws["running"] = bool(ws.get("pid")) and pid_alive(int(ws["pid"]))
        # the group's lag: the worker's own position stays at the last message of its topics
        ws["lag"] = st["groups"].get(name, {}).get("lag", ws.get("lag")) if ws["running"] else None
        ws["supervised"] = supervised.get(name)
    if json_out:
        typer.echo(json.dumps(st, default=str, indent=2))
        return
    out.print(f"broker {st['endpoint']}  pid {st['pid']}  log head [bold]{st['head']}[/]")
    t = Table("group", "patterns", "acked", "lag", "in flight", "redeliver", "members", "dead letters")
    for name, g in sorted(st["groups"].items()):
        pats = g["patterns"]
        shown = pats[0] if len(pats) == 1 else f"{len(pats)} patterns"
        t.add_row(name, shown, str(g["acked"]), str(g["lag"]), str(g["inflight"]), str(g["redelivery_pending"]),
                  str(g["members"]), str(g["dead_letters"]))
    out.print(_fit(t))
    if st["workers"]:
        w = Table("worker", "pid", "position", "lag", "applied", "failed", "dead letters", "last batch",
                  "max batch")
        for name, ws in sorted(st["workers"].items()):
            running = ws["running"]
            w.add_row(name, str(ws.get("pid")) if running else "[red]stopped[/]", str(ws.get("position")),
                      str(ws["lag"]) if running else "-", str(ws.get("applied")), str(ws.get("failed")),
                      str(ws.get("dead_lettered")), str(ws.get("last_batch")), str(ws.get("max_batch")))
        out.print(_fit(w))
        for name, ws in sorted(st["workers"].items()):
            if ws.get("exited") and not ws["running"]:
                out.print(f"[red]worker {name} ended:[/] {escape(ws['exited'])}{_restart_note(ws)}",
                          highlight=False)
            if ws.get("stalled"):
                out.print(f"[red]worker {name} cannot write its store, and keeps trying:[/] {escape(ws['stalled'])}")
            if ws.get("suspects"):
                out.print(f"[yellow]worker {name} isolates what it was applying when its process ended:[/] "
                          f"{ws['suspects']}")
    out.print("clients: " + ", ".join(f"{c['name']} ({c['source']})" for c in st["clients"]))
    out.print("counters: " + json.dumps(st["counters"]))
    if st.get("permissions_error"):
        out.print(f"[bold red]permissions[/]: {escape(st['permissions_error'])} (the rules read before are in force)",
                  highlight=False)


@app.command()
def topics(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Every topic with its payload contract (JSON Schema) and the worker that handles it."""
    del home  # taken like every command's; the catalog is the same for every home
    from contracts.catalog import load_all
    from contracts.registry import all_specs, json_schema

    load_all()
    specs = all_specs()
    followers = _followers()
    if json_out:
        typer.echo(json.dumps([{"topic": s.topic, "handled_by": s.handled_by,
                                "followed_by": followers(s.topic, s.handled_by), "description": s.description,
                                "schema": json_schema(s.topic)} for s in specs], indent=2))
        return
    from rich.padding import Padding

    for s in specs:  # a list, not a table: topic names stay whole in any terminal, the prose wraps under them
        schema = json_schema(s.topic)
        props = schema.get("$defs", {}).get(s.payload.__name__, schema).get("properties", {})
        followed = followers(s.topic, s.handled_by)
        who = s.handled_by or ("" if followed else "no worker")
        if followed:
            who = f"{who}{'; ' if who else ''}followed by {', '.join(followed)}"
        out.print(f"[bold]{s.topic}[/]  [cyan]{who}[/]", highlight=False)
        first = s.description.split(". ", 1)[0].rstrip(".")
        lines = [f"{first}." if first else "", f"[dim]fields: {', '.join(props)}[/]"]
        out.print(Padding("\n".join(filter(None, lines)), (0, 0, 0, 4)), highlight=False)


def _followers() -> Any:
    """(topic, its handler) -> the other workers whose groups take it (a change event has no handler: the stores
    that follow it)."""
    from contracts.topics import matches
    from workers.registry import available, load

    patterns = {name: load(name).patterns for name in available()}

    def followed(topic: str, handler: str) -> list[str]:
        return [n for n, pats in patterns.items() if n != handler and any(matches(p, topic) for p in pats)]

    return followed


@app.command()
def check(home: HomeOpt = None, json_out: JsonOpt = False,
          timeout: Annotated[float, typer.Option(help="Seconds to wait for the stores to catch up.")] = 30.0
          ) -> None:
    """Waits for every store to catch up, then checks they agree; exit 1 names what differs."""
    from bus.consistency import check as run_check

    logs.configure(level="warning")
    try:
        with _bus(home) as bus:
            report = run_check(bus, _home(home), timeout=timeout)
    except BusError as exc:
        _fail(exc)
        return
    if json_out:
        typer.echo(json.dumps(report.to_dict(), default=str, indent=2))
    else:
        t = Table("store", "running", "position", "acked", "lag", "holds", title=f"log head {report.head}")
        for s in report.stores:
            held = ", ".join(f"{n} {k}" for k, n in s.counts.items())
            t.add_row(s.name, "yes" if s.running else "[red]no[/]", str(s.position), str(s.acked),
                      str(s.lag) if not s.lag else f"[yellow]{s.lag}[/]", held)
        out.print(_fit(t))
        for d in report.differences:
            out.print(f"[bold red]differs[/] {d.describe()}", highlight=False)
        if report.ok:
            out.print("[bold green]consistent[/]: every store agrees with the structured store")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def rebuild(store: Annotated[str, typer.Argument(help="The store worker: lmdb, libsql, chroma or duckdb.")],
            home: HomeOpt = None,
            yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
            timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.", min=1.0)] = None
            ) -> None:
    """Wipes one store and applies the whole log to it again (its worker is stopped meanwhile; under `membus up`
    this returns once a new one has taken the store over)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bus.consistency import Progress as Step
    from bus.consistency import rebuild as run_rebuild
    from bus.consistency import wait_for_takeover

    logs.configure(level="warning")
    _known_worker(store, "store")
    if not yes and not typer.confirm(f"Delete the {store} store and rebuild it from the log?"):
        raise typer.Exit(1)
    successor: int | None = None
    try:
        with _bus(home) as bus, Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                         MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
            task = bar.add_task(f"{store}: stopping the worker", total=None)

            def show(step: Step) -> None:
                text = {"stopping": "stopping the worker", "wiping": "wiping the store",
                        "replaying": "replaying the log", "done": "done"}[step.phase]
                total = step.target or None
                bar.update(task, description=f"{store}: {text}", total=total,
                           completed=step.target if step.phase == "done" else step.position)

            result = run_rebuild(bus, _home(home), store, on_progress=show, timeout=timeout)
            if result.supervisor:
                bar.update(task, description=f"{store}: waiting for its worker to take over")
                successor = wait_for_takeover(_home(home), result, timeout=timeout or 120.0)
    except BusError as exc:
        _fail(exc)
        return
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]: {store} is partly rebuilt; its worker resumes from where it stopped")
        raise typer.Exit(130) from None
    after = (f"its worker under `membus up` (pid {successor}) has taken over" if result.supervisor else
             f"start its worker with `membus worker {store}` (or `membus up`)")
    stopped = f"stopped pid {result.stopped_pid}; " if result.stopped_pid else ""
    out.print(f"[bold green]rebuilt[/] {store}: applied the log up to {result.position} (head {result.head}) "
              f"in {result.seconds:.1f} s; {stopped}{after}", highlight=False)


@app.command()
def demo(home: HomeOpt = None) -> None:
    """Plays a short conversation through every store and shows what each one did (exit 0: all worked)."""
    from bus.demo import run as run_demo

    logs.configure(level="warning")
    raise typer.Exit(0 if run_demo(home, out) else 1)


# -- membus keys: the master key of the home (docs/security.md) ---------------------------------------------

modules_app = typer.Typer(help="The modules on the broker's allow-list: list, revoke.", no_args_is_help=True)
app.add_typer(modules_app, name="modules")


@modules_app.command("list")
def modules_list(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Every module whose key is on the allow-list (keys/modules), with its public key and when it enrolled."""
    h = _home(home)
    rows = [{"module": name, "public_key": key.decode(), "enrolled": _enrolled(h, name)}
            for key, name in sorted(h.allowed_modules().items(), key=lambda kv: kv[1])]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("module", "public key", "enrolled")
    for row in rows:
        table.add_row(row["module"], row["public_key"][:16] + "...", row["enrolled"])
    out.print(_fit(table))


def _enrolled(home: Home, name: str) -> str:
    when = (home.modules / f"{name}.key").stat().st_mtime
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


@modules_app.command("revoke")
def modules_revoke(module: str, home: HomeOpt = None,
                   yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False
                   ) -> None:
    """Takes a module off the allow-list: its key pair is deleted and a running broker cuts its connections
    within a second. A module that can write the home's keys folder can enrol again (docs/security.md)."""
    from bus.permissions import is_worker

    h = _home(home)
    if module not in h.allowed_modules().values():
        err.print(f"[bold red]error[/]: module {escape(module)!r} is not on the allow-list of {h.path}")
        raise typer.Exit(1)
    if is_worker(module):
        err.print(f"[bold red]error[/]: {escape(module)} is a store worker's identity: stop the worker instead")
        raise typer.Exit(2)
    if not yes and not typer.confirm(f"Revoke module {module!r}? Its clients are cut off"):
        raise typer.Exit(1)
    h.revoke_module(module)
    out.print(f"module {module} revoked: its key pair is deleted; a running broker cuts it off within a second")


keys_app = typer.Typer(help="The master key: init, status, change-passphrase, rotate.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
_REBUILT_FROM_LOG = ("lmdb", "chroma", "duckdb")
"""Stores that blind ids with the generation's key: a rotation deletes them and they replay the log."""


def _logs_to_stderr() -> None:
    """Key warnings (which source unlocked the home) go to stderr, so stdout stays the command's output."""
    import structlog

    structlog.configure(logger_factory=logs.stderr_loggers())


def _new_passphrase(ask: bool) -> str | None:
    """``--no-passphrase`` means none; else MEMBUS_PASSPHRASE or MEMBUS_PASSPHRASE_FILE, else a prompt."""
    from bus import keys

    if not ask:
        return None
    given = keys.env_passphrase()
    if given is not None:
        return given
    text: str = typer.prompt("new passphrase", hide_input=True, confirmation_prompt=True)
    return text


@keys_app.command("init")
def keys_init(home: HomeOpt = None,
              passphrase: Annotated[bool, typer.Option(help="Protect the key with a passphrase (prompted, or "
                                                             "MEMBUS_PASSPHRASE).")] = True,
              key_file: Annotated[bool, typer.Option(help="Also keep the unlock key in a 0600 file outside "
                                                          "the home.")] = False) -> None:
    """Create the home's master key (generation 1); `membus up` does this on first start too."""
    _logs_to_stderr()
    from bus import keys

    h = _home(home)
    h.ensure()
    try:
        master = keys.init(h.path, _new_passphrase(passphrase), remember=True if key_file else None)
    except BusError as exc:
        _fail(exc)
    out.print(f"master key {master.key_id} (generation 1) kept in: {master.source}")


@keys_app.command("status")
def keys_status(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Key id, generations, KDF parameters, keyring backend, and the source that unlocks the home now."""
    _logs_to_stderr()
    from bus import keys

    h = _home(home)
    report = {**keys.status(h.path), "encryption": h.settings().encryption}
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    for name, value in report.items():
        out.print(f"{name}: {value}", highlight=False)


@keys_app.command("change-passphrase")
def keys_change_passphrase(home: HomeOpt = None) -> None:
    """Rewrap the same master keys under a new passphrase: no data is re-encrypted."""
    _logs_to_stderr()
    from bus import keys

    h = _home(home)
    try:
        has_passphrase = keys.status(h.path).get("kdf") == "argon2id"
        old = typer.prompt("current passphrase", hide_input=True) if has_passphrase else None
        new = typer.prompt("new passphrase", hide_input=True, confirmation_prompt=True)
        master = keys.change_passphrase(h.path, old, new)
    except BusError as exc:
        _fail(exc)
    out.print(f"passphrase changed; master key {master.key_id} unchanged, nothing re-encrypted")


def _running(h: Home) -> list[str]:
    import os

    from workers.runtime import read_worker_status

    pids = {"membus up": h.supervisor_pid(), "broker": (h.read_run_file() or {}).get("pid")}
    pids.update({f"worker {n}": s.get("pid") for n, s in read_worker_status(h).items()})
    alive = []
    for name, pid in pids.items():
        if isinstance(pid, int) and pid > 0:
            try:
                os.kill(pid, 0)
                alive.append(f"{name} (pid {pid})")
            except (ProcessLookupError, PermissionError):
                continue
    return alive


def libsql_file_key(h: Home) -> bytes | None:
    """The libSQL file key of an encrypted home (None when encryption is off)."""
    from bus import keys
    from workers.libsql import file_key

    if not h.settings().encryption or not keys.metadata_path(h.path).exists():
        return None
    return file_key(keys.load_master_key(h.path).keyring(keys.store_label("libsql")))


@keys_app.command("rotate")
def keys_rotate(home: HomeOpt = None) -> None:
    """New master key generation; re-encrypts the log and libSQL, rebuilds the other stores from the log.

    Runs with membus stopped: the stores are rewritten offline.
    """
    _logs_to_stderr()
    import shutil

    from bus import keys
    from bus.log import EventLog
    from bus.sealing import KeyRingCipher
    from workers.libsql import DB_FILE, rekey

    h = _home(home)
    running = _running(h)
    if running:
        err.print(f"[bold red]error[/]: stop membus first (rotate re-encrypts the stores offline): "
                  f"{', '.join(running)} still running")
        raise typer.Exit(1)
    if not h.settings().encryption:
        err.print("[bold red]error[/]: encryption is off in this home (membus.toml): nothing to rotate")
        raise typer.Exit(1)
    try:
        rotation = keys.rotate(h.path)
        event_log = EventLog(h.log_dir, cipher=KeyRingCipher(rotation.new.keyring(keys.LOG_LABEL)))
        event_log.open()
        try:
            records = event_log.reseal()
        finally:
            event_log.close()
        rows = 0
        if (h.data_dir("libsql") / DB_FILE).exists():
            ring = rotation.new.keyring(keys.store_label("libsql"))
            rows = rekey(h.data_dir("libsql"), ring, rotation.old.generation)
        rebuilt = [w for w in _REBUILT_FROM_LOG if h.data_dir(w).exists()]
        for w in rebuilt:
            shutil.rmtree(h.data_dir(w))
    except BusError as exc:
        _fail(exc)
    out.print(f"generation {rotation.new.generation} (key {rotation.new.key_id}): {records} log records and "
              f"{rows} libSQL rows re-encrypted; rebuilt from the log at next start: {', '.join(rebuilt) or 'none'}")


def _migrate_home(ctx: typer.Context, home: HomeOpt = None) -> None:
    """Versioned schemas of the libSQL store: status, up, rollback."""
    ctx.obj = {"home": home, "open_home": _migrate_target}


def _migrate_target(home: Path | None) -> dict[str, Any]:
    """The libSQL store of ``home`` for `membus migrate` (schemas/cli.py), once a command runs."""
    from bus import keys

    _logs_to_stderr()  # stdout is the command's answer (`status --json`)
    h = _home(home)
    if h.settings().encryption and not keys.metadata_path(h.path).exists():
        err.print(f"[bold red]error[/]: {h.path} has no keys yet, so its libSQL store would be written unencrypted "
                  "and its worker could not open it: start membus once (`membus up`) or run `membus keys init`")
        raise typer.Exit(1)
    return {"db_path": h.data_dir("libsql") / "membus.db", "encryption_key": lambda: libsql_file_key(h),
            "running": _running(h)}


def _mount_migrate() -> None:
    from schemas.cli import app as migrate_app

    app.add_typer(migrate_app, name="migrate", callback=_migrate_home)


_mount_migrate()


def main() -> None:
    try:
        app()
    except BusError as exc:
        err.print(f"[bold red]error[/]: {escape(exc.message)}", highlight=False)
        sys.exit(exit_code(exc))
