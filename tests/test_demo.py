"""`membus demo` end to end: it starts its own membus in a temporary home, plays every step, exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.workers_util import REPO, child_env

pytestmark = pytest.mark.timeout(600)


def test_demo_runs_every_step_and_exits_0(tmp_path: Path) -> None:
    home = tmp_path / "no-membus-here"
    done = subprocess.run([sys.executable, "-m", "bus", "demo", "--home", str(home)], env=child_env({"COLUMNS": "120"}),
                          cwd=REPO, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "temporary home" in done.stdout
    for shown in ("hiking trip in the Alps", "4 messages counted today", "Loves hiking in the mountains",
                  "memory.store.complete", "every step worked"):
        assert shown in done.stdout
    assert not (home / "run").exists()  # it did not start anything in the home it was given


def test_demo_uses_the_running_membus(tmp_path: Path) -> None:
    from tests.workers_util import System

    home = tmp_path / "home"
    with System(home) as s:
        for name in ("libsql", "lmdb", "duckdb", "chroma"):
            s.worker(name)
        done = subprocess.run([sys.executable, "-m", "bus", "demo", "--home", str(home)], env=child_env(),
                              cwd=REPO, capture_output=True, text=True, timeout=500)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Using the membus running on" in done.stdout and "every step worked" in done.stdout
        demo_messages = [m for m in s.bus.replay(topic="conversation.message.changed")]
        assert len(demo_messages) == 4  # the demo's conversation went into this home's log
