"""Helpers for tests that run real worker processes: start one, kill it, wait for it to catch up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bus.client import Bus
from bus.consistency import pid_alive
from bus.home import Home
from bus.message import Message
from tests.conftest import BrokerProcess, wait_until

REPO = Path(__file__).resolve().parents[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: JSON logs, and this checkout importable (tests.* backends)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "MEMBUS_LOG_JSON": "1", "PYTHONPATH": path, **(extra or {})}


def stop_process(proc: subprocess.Popen[bytes] | None, *, term_timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited in time; returns the exit code (None if never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(term_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class WorkerProcess:
    """``python -m bus worker NAME --home DIR``, logging to ``<home>/worker-NAME.log``."""

    def __init__(self, home: Path, name: str, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.home = Home(home)
        self.name = name
        self.env = child_env(env)
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / f"worker-{name}.log"

    def start(self, wait: bool = True, timeout: float = 30.0) -> WorkerProcess:
        """Starts the worker; with ``wait``, returns once it consumes (its status file shows its pid)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bus", "worker", self.name,
                                          "--home", str(self.home.path)],
                                         env=self.env, cwd=REPO, stdout=log, stderr=log,
                                         preexec_fn=self.preexec_fn)
        if wait:
            wait_until(self._consuming, timeout=timeout, what=f"worker {self.name} consuming")
        return self

    def _consuming(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}: {self.log_tail()}")
        return self.status().get("pid") == self.proc.pid

    def kill(self) -> None:
        """kill -9: no batch is finished, no ack is sent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        return stop_process(self.proc)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, Any]:
        """The status file the worker writes about once a second ({} before the first one)."""
        try:
            data: dict[str, Any] = json.loads((self.home.path / "run" / f"worker-{self.name}.json").read_text())
            return data
        except (FileNotFoundError, json.JSONDecodeError):
            return {}


    def fresh_status(self, timeout: float = 30.0) -> dict[str, Any]:
        """The first status the worker writes after this call (it writes one about once a second)."""
        since = time.time()
        status: dict[str, Any] = wait_until(lambda: (s := self.status()) and s.get("updated", 0) > since and s,
                                            timeout=timeout, what=f"a new status of worker {self.name}")
        return status


def caught_up(bus: Bus, group: str) -> bool:
    """Whether the group has acknowledged everything in the log that it receives."""
    g = bus.status()["groups"].get(group)
    return bool(g) and g["lag"] == 0 and g["inflight"] == 0 and g["redelivery_pending"] == 0


def wait_caught_up(bus: Bus, group: str, timeout: float = 60.0) -> None:
    wait_until(lambda: caught_up(bus, group), timeout=timeout, interval=0.1, what=f"group {group} at lag 0")


def by_causation(messages: list[Message]) -> dict[str, int]:
    """How many logged messages each causing message id has."""
    counts: dict[str, int] = {}
    for m in messages:
        counts[m.causation_id] = counts.get(m.causation_id, 0) + 1
    return counts


def publish_all(bus: Bus, topic: str, payloads: list[Any]) -> list[int]:
    """Publishes every payload with many in flight; the seqs once all are durable."""
    pendings = [bus.publish_nowait(topic, p, timeout=60.0) for p in payloads]
    return [int(p.result(65.0)) for p in pendings]


class System:
    """A broker, a client connected as ``module`` and worker processes, all in one home.

    ``close()`` (or leaving the ``with`` block) stops every process it started, even after a failure.
    """

    def __init__(self, home: Path, *, broker_env: dict[str, str] | None = None,
                 worker_env: dict[str, str] | None = None, module: str = "test") -> None:
        self.home = home
        self.broker = BrokerProcess(home, env=child_env(broker_env))
        self.worker_env = worker_env or {}
        self.module = module
        self.workers: dict[str, WorkerProcess] = {}
        self._bus: Bus | None = None

    def start(self) -> System:
        self.broker.start()
        self._bus = Bus.connect(self.home, module=self.module, timeout=30.0)
        return self

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "System.start() first"
        return self._bus

    def worker(self, name: str, *, wait: bool = True) -> WorkerProcess:
        """Starts (or restarts) the worker ``name``; with ``wait``, returns once it has joined its group."""
        w = self.workers.get(name) or WorkerProcess(self.home, name, self.worker_env)
        self.workers[name] = w
        if w.alive:
            raise RuntimeError(f"worker {name} is already running")
        return w.start(wait)

    def close(self) -> None:
        try:
            for w in self.workers.values():
                w.stop()
            if self._bus is not None:
                self._bus.close()
        finally:
            self.broker.stop()

    def __enter__(self) -> System:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()




class UpProcess:
    """``python -m bus up --home DIR --workers ...`` in its own process group, logging to ``<home>/up.log``."""

    def __init__(self, home: Path, workers: list[str], env: dict[str, str] | None = None) -> None:
        self.home = Home(home)
        self.workers = workers
        self.env = child_env(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "up.log"

    def start(self, timeout: float = 60.0) -> UpProcess:
        self.home.path.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bus", "up", "--home", str(self.home.path),
                                          "--workers", ",".join(self.workers)],
                                         env=self.env, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        wait_until(lambda: all(self.worker_pid(w) for w in self.workers), timeout=timeout,
                   what="membus up: every worker consuming")
        return self

    def worker_pid(self, name: str) -> int | None:
        """The pid of the running worker ``name`` (from the status file it writes), or None."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"membus up exited: {self.log_tail()}")
        try:
            pid = int(json.loads((self.home.path / "run" / f"worker-{name}.json").read_text())["pid"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None
        return pid if pid_alive(pid) else None

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM to the supervisor; its exit code (raises if it does not exit in time)."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def kill_group(self) -> None:
        """The last resort: SIGKILL to the supervisor and every child in its process group."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.kill_group()  # the supervisor is gone; make sure no child outlives it
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.terminate()
        self.kill_group()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


def cli(home: Path, *args: str, timeout: float = 60.0, stdin: str = "",
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m bus ARGS --home HOME`` as a user would; the completed process, output as text."""
    return subprocess.run([sys.executable, "-m", "bus", *args, "--home", str(home)], env=child_env(env), cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
