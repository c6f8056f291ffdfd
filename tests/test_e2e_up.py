"""End to end through `membus up`: the supervisor, the broker, the LMDB and libSQL workers, the CLI.

One `membus up` runs for the module (its own process group, always stopped); each test uses its own
conversation. A companion module talks to it through the client library, a user through the CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.client import Bus
from contracts.registry import to_builtins
from tests.conftest import wait_until
from tests.workers_util import REPO, UpProcess, caught_up, child_env, cli, pid_alive
from workers.runtime import read_worker_status

WORKERS = ["lmdb", "libsql"]
TIMEOUT = 60.0
APPEND = "conversation.message.append.request"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    system = UpProcess(tmp_path_factory.mktemp("e2e") / "home", WORKERS)
    try:
        yield system.start()
    finally:
        system.stop()


@pytest.fixture
def companion(up: UpProcess) -> Iterator[Bus]:
    with Bus.connect(up.home.path, module="companion", timeout=30.0) as bus:
        yield bus


def ask(bus: Bus, topic: str, payload: dict[str, Any], **kw: Any) -> Any:
    return to_builtins(bus.request(topic, payload, timeout=TIMEOUT, **kw).payload)


def say(bus: Bus, conversation: str, i: int, text: str) -> Any:
    role = "user" if i % 2 == 0 else "assistant"
    return ask(bus, APPEND, {"conversation_id": conversation, "user_id": "ada", "role": role, "text": text},
               correlation_id=f"{conversation}-turn-{i}")


def working_memory(bus: Bus, conversation: str) -> list[str]:
    reply = ask(bus, "working.recent.request", {"conversation_id": conversation, "limit": 100})
    return [m["text"] for m in reply["messages"]]


TURNS = ["I love pancakes on Sunday mornings", "Pancakes it is: with blueberries?",
         "Yes, and maple syrup", "Noted: blueberries and maple syrup", "What did I say I love?"]


def test_a_conversation_is_stored_followed_into_working_memory_searched_and_traced(companion: Bus) -> None:
    stored = [say(companion, "c-talk", i, text) for i, text in enumerate(TURNS)]
    assert [m["text"] for m in stored] == TURNS

    # libSQL answers the history in order; LMDB follows its change events into working memory
    history = ask(companion, "conversation.history.request", {"conversation_id": "c-talk"})
    assert [m["text"] for m in history["messages"]] == TURNS and history["total"] == 5
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"] * 2 + ["user"]
    wait_until(lambda: working_memory(companion, "c-talk") == TURNS, timeout=TIMEOUT,
               what="working memory holds the conversation")

    hits = ask(companion, "memory.search.text.request", {"query": "maple syrup", "conversation_id": "c-talk",
                                                         "sources": ["messages"]})["hits"]
    assert sorted(h["text"] for h in hits) == sorted([TURNS[2], TURNS[3]])
    assert {h["id"] for h in hits} == {stored[2]["message_id"], stored[3]["message_id"]}

    # one turn's trace, from the log: the request, the change event it caused, its completion
    trace = list(companion.replay(correlation_id="c-talk-turn-2"))
    assert [m.topic for m in trace] == [APPEND, "conversation.message.changed",
                                        "conversation.message.append.complete"]
    request, changed, complete = trace
    assert request.source == "companion" and changed.source == complete.source == "worker-libsql"
    assert changed.causation_id == complete.causation_id == request.id
    assert request.seq < changed.seq < complete.seq
    assert changed.payload.message_id == complete.payload.message_id == stored[2]["message_id"]


def test_a_worker_killed_under_up_is_restarted_and_catches_up(up: UpProcess, companion: Bus) -> None:
    say(companion, "c-crash", 0, "before the crash")
    wait_until(lambda: working_memory(companion, "c-crash") == ["before the crash"], timeout=TIMEOUT,
               what="first message in working memory")
    old = up.worker_pid("lmdb")
    assert old
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not pid_alive(old), what="lmdb worker gone")
    during = [f"while lmdb was down {i}" for i in range(1, 6)]
    for i, text in enumerate(during, start=1):
        say(companion, "c-crash", i, text)  # libSQL stores them; its change events wait in the log for LMDB
    new = wait_until(lambda: (pid := up.worker_pid("lmdb")) and pid != old and pid, timeout=TIMEOUT,
                     what="the supervisor restarted the lmdb worker")
    assert pid_alive(new)
    wait_until(lambda: working_memory(companion, "c-crash") == ["before the crash", *during], timeout=TIMEOUT,
               what="the restarted worker caught up")
    wait_until(lambda: caught_up(companion, "lmdb"), timeout=TIMEOUT, what="lmdb group at lag 0")
    assert "child.exited" in up.log_tail(200_000)


def test_the_cli_publishes_requests_replays_and_reports_status(up: UpProcess, companion: Bus) -> None:
    home = up.home.path
    published = cli(home, "publish", "companion.mood.changed", '{"mood": "curious"}', "--correlation", "cli-1")
    assert published.returncode == 0, published.stderr
    seq = int(published.stdout.strip())
    (logged,) = companion.replay(from_seq=seq, to_seq=seq)
    assert (logged.topic, logged.payload, logged.source) == ("companion.mood.changed", {"mood": "curious"}, "cli")

    append = json.dumps({"conversation_id": "c-cli", "user_id": "ada", "role": "user", "text": "typed in a shell"})
    answered = cli(home, "request", APPEND, append)
    assert answered.returncode == 0, answered.stderr
    message = json.loads(answered.stdout)
    assert (message["conversation_id"], message["text"]) == ("c-cli", "typed in a shell")

    refused = cli(home, "request", APPEND, json.dumps({"conversation_id": "c-cli", "user_id": "ada",
                                                       "role": "robot", "text": "x"}))
    assert refused.returncode == 1 and "role" in refused.stderr

    history = cli(home, "request", "conversation.history.request", '{"conversation_id": "c-cli"}')
    assert [m["text"] for m in json.loads(history.stdout)["messages"]] == ["typed in a shell"]

    trace = cli(home, "replay", "--json", "--correlation", "cli-1")
    assert trace.returncode == 0, trace.stderr
    lines = [json.loads(line) for line in trace.stdout.splitlines()]
    assert [(d["seq"], d["topic"], d["payload"]) for d in lines] == [(seq, "companion.mood.changed",
                                                                      {"mood": "curious"})]

    wait_until(lambda: all(caught_up(companion, w) for w in WORKERS), timeout=TIMEOUT, what="workers at lag 0")
    status = cli(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["head"] >= seq
    for w in WORKERS:
        assert st["groups"][w]["members"] == 1 and st["groups"][w]["lag"] == 0
        assert st["workers"][w]["pid"] == up.worker_pid(w)
    assert st["workers"]["libsql"]["applied"] >= 1
    shown = cli(home, "status")  # not a terminal: rich lays the tables out 80 columns wide
    assert shown.returncode == 0, shown.stderr
    for w in WORKERS:  # each worker's row, with its pid and position whole (not "12345…")
        ws = st["workers"][w]
        row = next(line.split() for line in shown.stdout.splitlines() if line.split()[:2] == [w, str(ws["pid"])])
        assert row[2].isdigit() and int(row[2]) >= ws["position"], shown.stdout  # a worker may move on between

    usage = cli(home, "publish", "companion.mood.changed", "{not json")
    assert usage.returncode == 2 and "not valid JSON" in usage.stderr

    moods = [{"mood": m} for m in ("calm", "glad", "sleepy")]
    lines = cli(home, "publish", "companion.mood.changed", "-", stdin="\n".join(map(json.dumps, moods)) + "\n\n")
    assert lines.returncode == 0, lines.stderr
    seqs = [int(s) for s in lines.stdout.split()]
    assert len(seqs) == 3 and seqs == sorted(seqs)
    assert [(m.seq, m.payload) for m in companion.replay(from_seq=seqs[0], topic="companion.mood.changed")] == \
        list(zip(seqs, moods, strict=True))
    head = companion.status()["head"]
    bad_line = cli(home, "publish", "companion.mood.changed", "-", stdin='{"mood": "ok"}\n{oops\n')
    assert bad_line.returncode == 2 and "line 2 of stdin" in bad_line.stderr
    with_correlation = cli(home, "publish", "companion.mood.changed", "-", "--correlation", "c", stdin='{"mood": "x"}')
    assert with_correlation.returncode == 2 and "--correlation" in with_correlation.stderr
    assert not [m for m in companion.replay(from_seq=head + 1, topic="companion.mood.changed")]  # nothing sent


def test_status_json_gives_each_worker_the_lag_and_the_running_state_the_table_shows(up: UpProcess,
                                                                                    companion: Bus) -> None:
    """`status --json` gave a worker's lag as the log head minus the last message of its own topics: after traffic
    the worker does not take, a worker at lag 0 in its group (and in the table) showed thousands behind; and
    nothing said whether it still ran, other than a pid to test."""
    last = companion.publish_many("companion.mood.changed", [{"mood": "calm"}] * 50)[-1]
    wait_until(lambda: all(caught_up(companion, w) for w in WORKERS), timeout=TIMEOUT, what="workers at lag 0")
    wait_until(lambda: all(s.get("head", 0) >= last for s in read_worker_status(up.home).values()), timeout=TIMEOUT,
               what="the workers' status files seeing the new head")
    st = json.loads(cli(up.home.path, "status", "--json").stdout)
    for w in WORKERS:
        assert st["groups"][w]["lag"] == 0 and st["workers"][w]["lag"] == 0, st["workers"][w]
        assert st["workers"][w]["running"] is True


def test_check_is_clean_after_a_conversation_is_cleared_from_working_memory(up: UpProcess, companion: Bus) -> None:
    """The clear is what the app asked: check said working memory lacked those messages until their TTL passed."""
    for i, text in enumerate(TURNS[:2]):
        say(companion, "c-clear", i, text)
    wait_until(lambda: len(working_memory(companion, "c-clear")) == 2, timeout=TIMEOUT, what="working memory")
    cleared = ask(companion, "working.conversation.clear.request", {"conversation_id": "c-clear"})
    assert cleared["removed"] == 2 and working_memory(companion, "c-clear") == []
    checked = cli(up.home.path, "check", timeout=180.0)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_store_rebuilt_under_up_is_back_in_service_when_rebuild_returns(up: UpProcess, companion: Bus) -> None:
    """`membus rebuild` stops the store's worker; `membus up` starts another, which waits for the rebuild and
    then loads its store. Rebuild returns once that worker has taken over, so a `membus check` right after it
    finds every store running and consistent (it found the store not running before)."""
    for i, text in enumerate(TURNS[:2]):
        say(companion, "c-rebuild", i, text)
    home = up.home.path
    before = up.worker_pid("libsql")
    rebuilt = cli(home, "rebuild", "libsql", "--yes", timeout=180.0)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    successor = up.worker_pid("libsql")
    assert successor not in (None, before)
    assert f"(pid {successor}) has taken over" in " ".join(rebuilt.stdout.split())
    checked = cli(home, "check", timeout=180.0)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "consistent" in checked.stdout


def test_a_second_membus_up_on_the_same_home_is_refused_and_leaves_the_first_one_alone(up: UpProcess) -> None:
    """It derived the keys, started a broker that could not open the log, and on its way out deleted the first one's
    run/up.json, so offline commands (`keys rotate`, `migrate`) no longer saw that `membus up` ran on the home."""
    assert up.proc is not None
    done = cli(up.home.path, "up", "--workers", ",".join(WORKERS), timeout=TIMEOUT)
    assert done.returncode == 1 and f"already running on {up.home.path} (pid {up.proc.pid})" in done.stderr, \
        done.stderr
    assert "Traceback" not in done.stderr and "broker" not in done.stderr
    assert up.home.supervisor_pid() == up.proc.pid and up.worker_pid(WORKERS[0])


def test_home_may_be_given_before_the_command_as_after_it(up: UpProcess) -> None:
    """`membus --home DIR status` was refused (No such option: --home), though `membus migrate --home DIR status`
    was taken."""
    before = subprocess.run([sys.executable, "-m", "bus", "--home", str(up.home.path), "status", "--json"],
                            env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["pid"] == up.home.read_run_file()["pid"]  # type: ignore[index]


def test_sigterm_stops_membus_up_and_every_child_cleanly(tmp_path: Path) -> None:
    system = UpProcess(tmp_path / "home", WORKERS)
    try:
        system.start()
        with Bus.connect(system.home.path, module="companion", timeout=30.0) as bus:
            say(bus, "c-stop", 0, "last words")
            broker_pid = int(bus.status()["pid"])
        children = [broker_pid, *(system.worker_pid(w) or 0 for w in WORKERS)]
        assert all(children)
        assert system.terminate(timeout=20.0) == 0, system.log_tail()
        assert not [pid for pid in children if pid_alive(pid)]
        log = system.log_tail(200_000)
        assert "worker.stopped" in log and "broker.stopped" in log and "membus.stopped" in log
    finally:
        system.stop()


def test_status_says_when_membus_up_starts_a_crashing_worker_again(tmp_path: Path) -> None:
    """A worker that fails at every start showed as stopped with why, but not that it would be started again,
    when, or how often it had been."""
    system = UpProcess(tmp_path / "home", ["lmdb"])
    try:
        system.start()
        pid = system.worker_pid("lmdb")
        assert pid
        os.kill(pid, signal.SIGKILL)
        for store in system.home.data_dir("lmdb").rglob("data.mdb"):
            store.write_bytes(b"not an lmdb file " * 4096)

        def noted() -> str:
            said = " ".join(cli(system.home.path, "status", timeout=60.0).stdout.split())
            return said if "membus up starts it again in" in said else ""

        said = wait_until(noted, timeout=60.0, what="status notes the restart")
        assert re.search(r"worker lmdb ended: .*restarted [1-9]\d* times so far", said), said
        supervised = json.loads(cli(system.home.path, "status", "--json", timeout=60.0).stdout)
        assert supervised["workers"]["lmdb"]["supervised"]["restarts"] >= 1
    finally:
        system.stop()


def test_membus_up_killed_with_minus_9_takes_its_children_with_it(tmp_path: Path) -> None:
    """Orphans would keep the home's log open, unsupervised, and the next `membus up` could not start."""
    system = UpProcess(tmp_path / "home", WORKERS)
    again = UpProcess(tmp_path / "home", WORKERS)
    try:
        system.start()
        with Bus.connect(system.home.path, module="companion", timeout=30.0) as bus:
            children = [int(bus.status()["pid"]), *(system.worker_pid(w) or 0 for w in WORKERS)]
        assert all(children)
        assert system.proc is not None
        system.proc.kill()
        system.proc.wait(10)
        wait_until(lambda: not [pid for pid in children if pid_alive(pid)], timeout=30.0,
                   what="the broker and workers stopping with their supervisor")
        again.start()
        with Bus.connect(again.home.path, module="companion", timeout=30.0) as bus:
            assert say(bus, "c-orphans", 0, "after the kill")["message_id"]
        assert again.terminate(timeout=20.0) == 0, again.log_tail()
    finally:
        system.stop()
        again.stop()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/PID/environ")
def test_the_passphrase_stays_with_membus_up_and_is_not_handed_to_its_children(tmp_path: Path) -> None:
    """Each child gets its own derived keys over a pipe; with the passphrase it could unlock every store's."""
    system = UpProcess(tmp_path / "home", ["lmdb"], env={"MEMBUS_PASSPHRASE": "pp-not-for-children"})
    try:
        system.start()
        with Bus.connect(system.home.path, module="companion", timeout=30.0) as bus:
            children = [int(bus.status()["pid"]), system.worker_pid("lmdb") or 0]
        environments = [Path(f"/proc/{pid}/environ").read_bytes() for pid in children]
        assert all(b"MEMBUS_KEY_FD=" in e for e in environments)
        assert not [e for e in environments if b"pp-not-for-children" in e]
    finally:
        system.stop()


def test_ctrl_c_stops_the_workers_before_the_broker(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches every process of the group: the broker stopped with the workers, and a worker in
    the middle of a batch waited for it until membus up killed it."""
    system = UpProcess(tmp_path / "home", WORKERS)
    try:
        system.start()
        with Bus.connect(system.home.path, module="companion", timeout=30.0) as bus:
            say(bus, "c-ctrl-c", 0, "last words")
        assert system.proc is not None
        os.killpg(system.proc.pid, signal.SIGINT)
        assert system.proc.wait(30) == 0, system.log_tail()
        log = system.log_tail(200_000)  # the processes share it: lines may interleave, events stay whole
        stopped = [m.start() for m in re.finditer(r'"event": "worker\.stopped"', log)]
        assert len(stopped) == len(WORKERS) and max(stopped) < log.index('"event": "broker.stopped"'), log[-3000:]
    finally:
        system.stop()


def test_membus_up_stops_with_its_children_when_its_home_is_removed(tmp_path: Path) -> None:
    """The workers crash-looped on their missing stores, beside a broker whose log was gone."""
    system = UpProcess(tmp_path / "home", ["lmdb"])
    try:
        system.start()
        with Bus.connect(system.home.path, module="companion", timeout=30.0) as bus:
            children = [int(bus.status()["pid"]), system.worker_pid("lmdb") or 0]
        assert all(children) and system.proc is not None
        shutil.rmtree(system.home.path)
        assert system.proc.wait(30) == 1
        wait_until(lambda: not [pid for pid in children if pid_alive(pid)], timeout=30.0,
                   what="the broker and worker stopping with their supervisor")
    finally:
        system.stop()


def test_the_readme_module_example_runs_as_written(up: UpProcess, tmp_path: Path) -> None:
    """It looped for ever on a live subscription and named an undefined variable."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\nfrom bus import Bus")
    example = readme[start + len("```python\n"):readme.index("```", start + 10)]
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run([sys.executable, str(script)], env=child_env({"MEMBUS_HOME": str(up.home.path)}),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "I love hiking" in done.stdout and "conversation.message.append.complete" in done.stdout, done.stdout
