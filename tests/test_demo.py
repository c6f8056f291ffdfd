"""`membus demo` end to end: it starts its own membus in a temporary home, plays every step, exits 0."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.home import Home
from tests.workers_util import REPO, child_env, stop_process

pytestmark = pytest.mark.timeout(600)


def test_demo_runs_every_step_and_exits_0(tmp_path: Path) -> None:
    home = tmp_path / "no-membus-here"
    done = subprocess.run([sys.executable, "-m", "bus", "demo", "--home", str(home)], env=child_env({"COLUMNS": "120"}),
                          cwd=REPO, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "temporary home" in done.stdout
    for shown in ("hiking trip in the Alps", "4 messages counted in this conversation", "Loves hiking in the mountains",
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


def test_a_terminated_demo_stops_the_membus_it_started(tmp_path: Path) -> None:
    """SIGTERM (a `kill`, a closing session) used to end the demo at once, leaving its membus running for ever."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    demo = subprocess.Popen([sys.executable, "-m", "bus", "demo", "--home", str(tmp_path / "no-membus-here")],
                            env=child_env({"TMPDIR": str(scratch), "MEMBUS_EMBEDDING_MODEL": "hash"}), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = _pids_once_running(scratch, demo)
    try:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(90) != 0
        assert list(scratch.iterdir()) == []  # the temporary home is deleted
        for pid in started:  # `membus up` and its broker
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        stop_process(demo)
        with contextlib.suppress(ProcessLookupError):
            os.kill(started[0], signal.SIGTERM)  # what a failure here would leave behind


def _pids_once_running(scratch: Path, demo: subprocess.Popen[bytes]) -> list[int]:
    deadline = time.monotonic() + 120
    while demo.poll() is None and time.monotonic() < deadline:
        run = [Home(home).path / "run" for home in scratch.glob("membus-demo-*/home")]
        found = [json.loads(f.read_text()).get("pid") for r in run for f in (r / "up.json", r / "broker.json")
                 if f.exists()]
        if len(found) == 2:
            return [int(pid) for pid in found]
        time.sleep(0.2)
    raise AssertionError("the demo's membus did not start")
