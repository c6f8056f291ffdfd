"""Fixtures that start real processes and always stop them."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bus import logs
from bus.client import Bus
from bus.home import Home
from contracts.catalog import load_all

load_all()  # as every worker does: a topic decodes against the same contract in every test
# every level, as in the processes (Bus.connect would otherwise keep an unconfigured process to warnings, and
# the tests that capture a worker's info lines would see none of them once a test had connected)
logs.configure(level="debug", json=False)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Keys the tests make stay in a folder of this run: never the user's keyring or ~/.config/membus.
os.environ["XDG_CONFIG_HOME"] = _config = tempfile.mkdtemp(prefix="membus-test-config-")
atexit.register(shutil.rmtree, _config, True)
os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


class BrokerProcess:
    def __init__(self, home: Path, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.home = Home(home)
        self.env = {**os.environ, "MEMBUS_LOG_JSON": "1", **(env or {})}
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "broker.log"

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        self.home.ensure()
        old = self.home.read_run_file()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bus", "broker", "--home", str(self.home.path)],
                                         env=self.env, stdout=log, stderr=log, preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.home.read_run_file()
            if run and run.get("pid") == self.proc.pid and run != old:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError("broker did not start in time")

    @property
    def endpoint(self) -> str:
        run = self.home.read_run_file()
        assert run
        return str(run["endpoint"])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path / "home").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def bus(broker: BrokerProcess) -> Iterator[Bus]:
    with Bus.connect(broker.home.path, module="test") as b:
        yield b


def wait_until(cond, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
