"""`membus up`: runs the broker and every worker as child processes and keeps them running.

A child that dies is restarted with exponential back-off (reset once it has run
for a minute). Ctrl-C or SIGTERM stops the workers first (they finish their
batch), then the broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus import keys
from bus.home import Home
from contracts.errors import BusError

log = structlog.get_logger("membus.supervisor")

SUPERVISOR_ENV = "MEMBUS_SUPERVISOR_PID"
"""Set for every child: a worker shows it in its status, so ``membus rebuild`` knows a new worker will come."""


def supervised() -> bool:
    """Whether this process is a child of a running ``membus up``."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV) or 0)
    return bool(supervisor) and os.getppid() == supervisor


def follow_supervisor(poll_s: float = 0.5) -> None:
    """In a child of ``membus up``: Ctrl-C is left to the supervisor, which stops the workers before the broker
    (the terminal sends SIGINT to every process of the group: the broker stopped at once, and a worker in the
    middle of a batch waited for it until it was killed). And once the supervisor is gone (kill -9), this
    process stops as on SIGTERM, so none is left running unsupervised, holding the home."""
    if not supervised():
        return
    supervisor = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(poll_s)
        log.warning("supervisor.gone", supervisor=supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="membus-supervisor-watch", daemon=True).start()


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 0.5
    restart_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    keyrings: list[keys.KeyRing] = field(default_factory=list, repr=False)
    """Only this child's derived keys, handed over an inherited pipe at every start."""

    def start(self) -> None:
        env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
        if not self.keyrings:
            self.proc = subprocess.Popen(self.argv, env=env)
        else:
            # its own keys come over the pipe: what unlocks the master key (every store's keys) stays here
            for name in (keys.ENV_PASSPHRASE, keys.ENV_PASSPHRASE_FILE, keys.ENV_KEY_FILE):
                env.pop(name, None)
            fd = keys.keyring_pipe(self.keyrings)
            try:
                self.proc = subprocess.Popen(self.argv, pass_fds=(fd,), env={**env, keys.ENV_KEY_FD: str(fd)})
            finally:
                os.close(fd)
        self.started = time.monotonic()
        log.info("child.started", child=self.name, pid=self.proc.pid)


class Supervisor:
    def __init__(self, home: Home, workers: list[str]) -> None:
        self.home = home
        base = [sys.executable, "-m", "bus"]
        h = ["--home", str(home.path)]
        self.broker = Child("broker", [*base, "broker", *h])
        self.workers = [Child(w, [*base, "worker", w, *h]) for w in workers]
        self._stop = False

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self, *, ready_timeout: float = 60.0) -> None:
        self._refuse_a_second_one()
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.home.ensure()
        self.home.write_supervisor_file()
        try:
            self._supervise(ready_timeout)
        finally:
            self.home.remove_supervisor_file()

    def _refuse_a_second_one(self) -> None:
        """Another ``membus up`` on this home: said at once, and its run/up.json is left to it (this one removed it
        on its way out, after its broker had failed to open the log)."""
        from bus.consistency import pid_alive

        running = self.home.supervisor_pid()
        if running and running != os.getpid() and pid_alive(running):
            raise BusError(f"membus up is already running on {self.home.path} (pid {running})",
                           home=str(self.home.path), pid=running)

    def _supervise(self, ready_timeout: float) -> None:
        self._hand_out_keys()
        if self._stop:  # Ctrl-C or SIGTERM while the keys were derived: nothing to start
            return
        self.broker.start()
        try:
            self._wait_for_broker(ready_timeout)
            if not self._stop:
                for w in self.workers:
                    w.start()
            while not self._stop:
                self._check_home()
                for child in [self.broker, *self.workers]:
                    self._watch(child)
                time.sleep(0.2)
        finally:
            self._shutdown()

    def _wait_for_broker(self, ready_timeout: float) -> None:
        deadline = time.monotonic() + ready_timeout
        while not self._stop:
            run = self.home.read_run_file()
            if run and self.broker.proc and run.get("pid") == self.broker.proc.pid:
                log.info("broker.ready", endpoint=run["endpoint"])
                return
            if self.broker.proc and self.broker.proc.poll() is not None:
                raise SystemExit(f"the broker exited with code {self.broker.proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit("the broker did not start in time")
            time.sleep(0.05)

    def _check_home(self) -> None:
        """A removed home stops everything: restarted workers would crash on their missing stores for ever,
        or make new empty ones beside a broker whose log is gone."""
        if not self.home.path.is_dir():
            log.error("home.removed", home=str(self.home.path))
            raise SystemExit(f"membus: the home {self.home.path} was removed while membus ran; stopped")

    def _hand_out_keys(self) -> None:
        """Unlocks the home once (Argon2id runs here, not in every child) and gives each child its keys."""
        keys.check_encryption_setting(self.home.path, self.home.settings().encryption)
        if not self.home.settings().encryption:
            log.warning("keys.encryption_off", home=str(self.home.path))
            return
        master = keys.load_master_key(self.home.path, create=True)
        log.info("keys.loaded", source=str(master.source), key_id=master.key_id, generation=master.generation)
        self.broker.keyrings = [master.keyring(keys.LOG_LABEL)]
        for w in self.workers:
            w.keyrings = [master.keyring(keys.store_label(w.name))]

    def _watch(self, child: Child) -> None:
        now = time.monotonic()
        proc = child.proc
        if proc is not None and proc.poll() is None:
            if now - child.started > 60:
                child.backoff = 0.5
            return
        if proc is not None:
            log.warning("child.exited", child=child.name, code=proc.returncode, restart_in=child.backoff)
            child.proc = None
            child.last_exit = proc.returncode
            child.restart_at = now + child.backoff
            child.backoff = min(child.backoff * 2, 30.0)
            self._tell()
            return
        if now >= child.restart_at:
            child.restarts += 1
            child.start()
            self._tell()

    def _tell(self) -> None:
        """Each child's restarts, for ``membus status`` (a worker crashing at start is shown as stopped, with why;
        this says that it will be started again, and when)."""
        wall, now = time.time(), time.monotonic()
        self.home.write_supervisor_file({
            c.name: {"restarts": c.restarts, "last_exit": c.last_exit,
                     "restart_at": None if c.proc is not None else wall + max(0.0, c.restart_at - now)}
            for c in [self.broker, *self.workers]})

    def _shutdown(self) -> None:
        for group in (self.workers, [self.broker]):
            for c in group:
                if c.proc and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            for c in group:
                if c.proc:
                    try:
                        c.proc.wait(15)
                    except subprocess.TimeoutExpired:
                        c.proc.kill()
                        c.proc.wait(5)
        log.info("membus.stopped")
