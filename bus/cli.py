"""The `membus` command. Every command takes --home DIR (env MEMBUS_HOME).

Exit codes: 0 ok, 1 a bus error (printed), 2 usage error, 3 timeout, 4 not authorized.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from bus import logs
from bus.home import Home
from contracts.errors import BusError, NotAuthorized, TimeoutError

app = typer.Typer(help="membus: a durable local bus in front of your AI companion's memory stores.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)

HomeOpt = Annotated[Path | None, typer.Option("--home", envvar="MEMBUS_HOME", help="The membus home folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _home(home: Path | None) -> Home:
    return Home(home)


def _bus(home: Path | None, module: str = "cli") -> Any:
    from bus.client import Bus

    return Bus.connect(home, module=module, timeout=10.0)


def _fail(exc: BusError) -> None:
    err.print(f"[bold red]error[/]: {exc.message}", highlight=False)
    code = 3 if isinstance(exc, TimeoutError) else 4 if isinstance(exc, NotAuthorized) else 1
    raise typer.Exit(code)


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        err.print(f"[bold red]error[/]: {what} is not valid JSON: {exc}")
        raise typer.Exit(2) from None


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


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
    names = [w for w in workers.split(",") if w] if workers else [w for w in h.settings().workers
                                                                  if w in available()]
    err.print(f"membus: home {h.path}, workers: {', '.join(names) or 'none'}")
    Supervisor(h, names).run()


@app.command()
def broker(home: HomeOpt = None) -> None:
    """Run the broker alone, in the foreground."""
    from bus.broker import run

    logs.configure(process="broker")
    run(home)


@app.command()
def worker(name: str, home: HomeOpt = None) -> None:
    """Run one store worker in the foreground (`membus up` runs them all)."""
    from workers.runtime import run

    logs.configure(process=f"worker-{name}")
    run(name, home)


@app.command()
def publish(topic: str, payload: Annotated[str, typer.Argument(help="The payload as JSON.")],
            home: HomeOpt = None, correlation: Annotated[str, typer.Option(help="Correlation id.")] = "",
            timeout: float = 10.0) -> None:
    """Publish a message; prints its sequence number once it is durable."""
    logs.configure(level="warning")
    data = _parse_json(payload, "the payload")
    try:
        with _bus(home) as bus:
            typer.echo(bus.publish(topic, data, correlation_id=correlation, timeout=timeout))
    except BusError as exc:
        _fail(exc)


@app.command()
def request(topic: str, payload: Annotated[str, typer.Argument(help="The payload as JSON.")],
            home: HomeOpt = None, timeout: float = 10.0) -> None:
    """Send a request and print the reply as JSON."""
    logs.configure(level="warning")
    data = _parse_json(payload, "the payload")
    try:
        with _bus(home) as bus:
            reply = bus.request(topic, data, timeout=timeout)
            typer.echo(json.dumps(reply.to_dict()["payload"], default=str))
    except BusError as exc:
        _fail(exc)


def _line(msg: Any) -> str:
    d = msg.to_dict()
    when = datetime.fromtimestamp(d["ts"] / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]
    payload = json.dumps(d.get("payload", d.get("payload_error")), default=str, ensure_ascii=False)
    if len(payload) > 160:
        payload = payload[:157] + "..."
    return f"{d['seq']:>8}  {when}  {d['topic']:<36} {d['source']:<14} {d['correlation_id'][-8:]}  {payload}"


@app.command()
def tail(pattern: Annotated[str, typer.Argument(help="Topic pattern, e.g. 'memory.>'")] = ">",
         home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Follow live messages."""
    logs.configure(level="warning")
    try:
        with _bus(home) as bus, bus.subscribe(pattern) as sub:
            for msg in sub:
                typer.echo(json.dumps(msg.to_dict(), default=str) if json_out else _line(msg))
    except KeyboardInterrupt:
        pass
    except BusError as exc:
        _fail(exc)


@app.command()
def replay(home: HomeOpt = None,
           topic: Annotated[str | None, typer.Option(help="Topic pattern.")] = None,
           from_seq: Annotated[int, typer.Option("--from-seq")] = 1,
           to_seq: Annotated[int | None, typer.Option("--to-seq")] = None,
           since: Annotated[str | None, typer.Option(help="How far back, e.g. 10m, 2h, 1d.")] = None,
           correlation: Annotated[str | None, typer.Option(help="Only this correlation id (one trace).")] = None,
           json_out: JsonOpt = False) -> None:
    """Print the log: by sequence range, time, topic pattern or correlation id."""
    logs.configure(level="warning")
    since_ts = time.time() - parse_duration(since) if since else None
    try:
        with _bus(home) as bus:
            for msg in bus.replay(topic=topic, from_seq=from_seq, to_seq=to_seq, since=since_ts,
                                  correlation_id=correlation):
                typer.echo(json.dumps(msg.to_dict(), default=str) if json_out else _line(msg))
    except BusError as exc:
        _fail(exc)


@app.command()
def status(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Log head, consumer groups (acked, lag, in flight, dead letters), workers, clients."""
    from workers.runtime import read_worker_status

    logs.configure(level="warning")
    try:
        with _bus(home) as bus:
            st = bus.status()
    except BusError as exc:
        _fail(exc)
        return
    st["workers"] = read_worker_status(_home(home))
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
    out.print(t)
    if st["workers"]:
        w = Table("worker", "pid", "position", "lag", "applied", "failed", "dead-lettered", "last batch",
                  "max batch")
        for name, ws in sorted(st["workers"].items()):
            w.add_row(name, str(ws.get("pid")), str(ws.get("position")), str(ws.get("lag")), str(ws.get("applied")),
                      str(ws.get("failed")), str(ws.get("dead_lettered")), str(ws.get("last_batch")),
                      str(ws.get("max_batch")))
        out.print(w)
    out.print("clients: " + ", ".join(f"{c['name']} ({c['source']})" for c in st["clients"]))
    out.print("counters: " + json.dumps(st["counters"]))


@app.command()
def topics(json_out: JsonOpt = False) -> None:
    """Every topic with its payload contract (JSON Schema) and the worker that handles it."""
    from contracts.catalog import load_all
    from contracts.registry import all_specs, json_schema

    load_all()
    specs = all_specs()
    if json_out:
        typer.echo(json.dumps([{"topic": s.topic, "handled_by": s.handled_by, "description": s.description,
                                "schema": json_schema(s.topic)} for s in specs], indent=2))
        return
    t = Table("topic", "handled by", "fields", "description")
    for s in specs:
        schema = json_schema(s.topic)
        props = schema.get("$defs", {}).get(s.payload.__name__, schema).get("properties", {})
        t.add_row(s.topic, s.handled_by, ", ".join(props), s.description[:60])
    out.print(t)


def _migrate_home(ctx: typer.Context, home: HomeOpt = None) -> None:
    """Versioned schemas of the libSQL store: status, up, rollback."""
    ctx.obj = {"db_path": _home(home).data_dir("libsql") / "membus.db", "encryption_key": None}


def _mount_migrate() -> None:
    from schemas.cli import app as migrate_app

    app.add_typer(migrate_app, name="migrate", callback=_migrate_home)


_mount_migrate()


def main() -> None:
    try:
        app()
    except BusError as exc:
        err.print(f"[bold red]error[/]: {exc.message}")
        sys.exit(1)
