"""How the `membus` command lays out its tables for a person."""

from __future__ import annotations

import subprocess
import sys

from rich.console import Console
from rich.table import Table

from bus.cli import _fit
from contracts.catalog import load_all
from contracts.registry import all_specs
from tests.workers_util import REPO, child_env


def test_status_tables_keep_every_number_whole_in_80_columns() -> None:
    table = Table("worker", "pid", "position", "lag", "applied", "failed", "dead letters", "last batch", "max batch")
    for name in ("chroma", "duckdb", "libsql", "lmdb"):
        table.add_row(name, "4194304", "10000000", "[yellow]5[/]", "10000000", "0", "0", "500", "500")
    console = Console(width=80, record=True)
    console.print(_fit(table))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = [line.split() for line in lines if line.split()[:1] == ["lmdb"]]
    assert rows == [["lmdb", "4194304", "10000000", "5", "10000000", "0", "0", "500", "500"]]
    assert "position" in lines[1].split() and "letters" in lines[1].split()  # headers whole too (two lines)


def test_the_topic_catalog_shows_every_topic_whole_in_80_columns() -> None:
    shown = subprocess.run([sys.executable, "-m", "bus", "topics"], env=child_env(), cwd=REPO, capture_output=True,
                           text=True, timeout=60, check=True)  # not a terminal: 80 columns
    heads = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines() if line and line[0] != " "}
    load_all()
    assert {s.topic: [s.handled_by or "no", *([] if s.handled_by else ["worker"])] for s in all_specs()} == heads
    assert max(map(len, shown.stdout.splitlines())) <= 80
