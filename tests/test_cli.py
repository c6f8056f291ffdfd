"""The `membus` command as a person meets it: how it lays out its tables, and what it says of bad settings."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table

from bus.cli import _fit, json_line
from bus.home import Settings
from contracts.errors import ValidationError
from tests.conftest import BrokerProcess
from tests.workers_util import WorkerProcess, cli
from workers.runtime import runtime_settings


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


def test_the_topic_catalog_shows_every_topic_whole_in_80_columns(tmp_path: Path) -> None:
    shown = cli(tmp_path, "topics").stdout  # not a terminal: 80 columns
    heads = {line.split()[0]: line.split()[1:] for line in shown.splitlines() if line and line[0] != " "}
    catalog = json.loads(cli(tmp_path, "topics", "--json").stdout)  # its registry (tests here register more)
    assert len(catalog) > 40

    def who(t: dict[str, Any]) -> list[str]:  # the handler, and the stores that follow the topic as well
        text = t["handled_by"] or ("" if t["followed_by"] else "no worker")
        if t["followed_by"]:
            text = f"{text}{'; ' if text else ''}followed by {', '.join(t['followed_by'])}"
        return text.split()

    assert {t["topic"]: who(t) for t in catalog} == heads
    assert max(map(len, shown.splitlines())) <= 80
    followed = {t["topic"]: t["followed_by"] for t in catalog}
    assert followed["conversation.message.changed"] == ["lmdb", "chroma", "duckdb"]  # was "no worker"
    assert followed["memory.fact.changed"] == ["chroma", "duckdb"]


def test_a_wrong_setting_is_named_and_nothing_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting of the wrong type or out of bounds used to reach the broker as is (a heartbeat of -1 s)."""
    home = tmp_path / "home"
    home.mkdir()
    for text, name in (("heartbeat_s = -1.0\n", "heartbeat_s"), ('max_attempts = "many"\n', "max_attempts"),
                       ("ack_timeout_s = [\n", "membus.toml")):
        (home / "membus.toml").write_text(text)
        done = cli(home, "broker", timeout=60.0)
        assert done.returncode == 1 and name in done.stderr and "Traceback" not in done.stderr, done.stderr
    (home / "membus.toml").write_text("heartbeat_s = 2.5\n")
    monkeypatch.setenv("MEMBUS_MAX_ATTEMPTS", "7")  # a variable is text: "7" is taken as the int it spells
    settings = Settings.load(home)
    assert (settings.heartbeat_s, settings.max_attempts) == (2.5, 7)


def test_a_worker_setting_out_of_bounds_is_named() -> None:
    """A batch size of 0 made a worker fetch nothing, for ever; text where a number belongs was a traceback."""
    for var, value in (("MEMBUS_WORKER_BATCH_SIZE", "0"), ("MEMBUS_WORKER_BATCH_SIZE", "lots"),
                       ("MEMBUS_WORKER_ACK_TIMEOUT_S", "nan"), ("MEMBUS_WORKER_MAX_ATTEMPTS", "-1")):
        with pytest.raises(ValidationError) as info:
            runtime_settings({var: value})
        assert info.value.field == var
    assert runtime_settings({"MEMBUS_WORKER_BATCH_SIZE": "50", "MEMBUS_WORKER_ACK_TIMEOUT_S": "0.001"}) == {
        "batch_size": 50, "ack_timeout_s": 0.001}


def test_an_unknown_worker_or_a_home_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    """Both were tracebacks; `membus up --workers lmdb,nosuch` restarted the unknown one for ever."""
    home = tmp_path / "home"
    for args in (("worker", "nosuch"), ("up", "--workers", "lmdb,nosuch"), ("rebuild", "nosuch", "--yes")):
        done = cli(home, *args, timeout=60.0)
        assert done.returncode == 2 and "unknown" in done.stderr and "'nosuch'" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    for args in (("status",), ("broker",), ("worker", "lmdb"), ("keys", "init", "--no-passphrase")):
        done = cli(a_file, *args, timeout=60.0)
        said = " ".join(re.sub("[│╭╮╰╯─]", " ", done.stderr).split())  # rich's box may wrap the message
        assert done.returncode == 2 and "is a file" in said and "Traceback" not in done.stderr, done.stderr


def test_up_on_a_home_it_cannot_write_says_so_in_one_line(tmp_path: Path) -> None:
    """On a read-only home `membus up` ended in a traceback (OSError: Read-only file system, from os.chmod); a
    home whose keys folder is a file fails the same way, for any user."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "keys").write_text("")
    done = cli(home, "up", "--workers", "lmdb", timeout=60.0)
    said = " ".join(done.stderr.split())
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot set up the home folder {home / 'keys'}" in said, done.stderr


def test_a_worker_that_cannot_take_its_store_lock_says_so_in_one_line(broker: BrokerProcess) -> None:
    """On a read-only home `membus worker` ended in a traceback from the store lock."""
    (broker.home.path / "run" / "worker-lmdb.lock").mkdir(parents=True)  # fails like a read-only file system
    done = cli(broker.home.path, "worker", "lmdb", timeout=60.0)
    said = " ".join(done.stderr.split())
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "error: worker lmdb: cannot take the store lock" in said, done.stderr


def test_a_payload_with_nan_or_infinity_and_a_rebuild_timeout_below_a_second_are_usage_errors(tmp_path: Path) -> None:
    """NaN went into the log and came out of `replay --json` as invalid JSON; a 0 s rebuild wiped the store, then
    gave up."""
    for text in ('{"score": NaN}', '{"big": Infinity}', '{"small": -Infinity}', '{"big": 1e999}', '[-1e400]'):
        done = cli(tmp_path, "publish", "app.note.changed", text)
        assert done.returncode == 2 and "not valid JSON" in done.stderr, done.stderr
    done = cli(tmp_path, "rebuild", "lmdb", "--yes", "--timeout", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_a_bad_topic_or_pattern_is_a_usage_error_named_before_any_wait(tmp_path: Path) -> None:
    """An invalid pattern exited 1, as if the bus had failed, and only after waiting for a broker."""
    for args in (("tail", "memory.>.x"), ("replay", "--topic", "a..b"), ("publish", "Bad.Topic", "{}"),
                 ("request", "single", "{}")):
        done = cli(tmp_path, *args, timeout=60.0)
        said = " ".join(re.sub("[│╭╮╰╯─]", " ", done.stderr).split())
        assert done.returncode == 2 and "invalid topic" in said and "waiting" not in said, (args, done.stderr)


def test_a_bad_since_names_the_option(tmp_path: Path) -> None:
    """`replay --since 5` said only "Invalid value: '5'", naming no option."""
    done = cli(tmp_path, "replay", "--since", "5", timeout=60.0)
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", done.stderr).split())
    assert done.returncode == 2 and "Invalid value for '--since'" in said and "waiting" not in said, done.stderr


def test_a_command_with_no_broker_says_what_it_waits_for(tmp_path: Path) -> None:
    """It waited 10 s in silence; with a run file left by a killed broker it said only "did not answer"."""
    done = cli(tmp_path, "status", timeout=60.0)
    assert done.returncode == 1 and "no broker is running" in done.stderr and "waiting" in done.stderr
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "broker.json").write_text(json.dumps({"endpoint": "tcp://127.0.0.1:9", "pid": gone.pid}))
    done = cli(tmp_path, "status", timeout=60.0)
    assert done.returncode == 1 and f"(pid {gone.pid}) has ended" in done.stderr, done.stderr


def test_json_lines_stay_strict_json_when_a_logged_payload_holds_nan_or_infinity() -> None:
    """`replay --json` printed bare NaN and Infinity, which jq and strict parsers refuse."""
    line = json_line({"seq": 1, "payload": {"x": float("nan"), "y": [float("inf"), -float("inf")], "z": 1.5}})

    def refuse(name: str) -> None:
        raise ValueError(name)

    assert json.loads(line, parse_constant=refuse)["payload"] == {"x": "NaN", "y": ["Infinity", "-Infinity"],
                                                                  "z": 1.5}


def test_an_empty_correlation_id_is_a_usage_error(tmp_path: Path) -> None:
    """It printed the whole log."""
    done = cli(tmp_path, "replay", "--correlation", "", timeout=60.0)
    assert done.returncode == 2 and "empty" in done.stderr, done.stderr


def test_a_misspelt_worker_in_the_settings_is_named_and_a_mistyped_home_is_not_made(tmp_path: Path) -> None:
    """`workers = lmdb,chromadb` started lmdb alone without a word; `status --home typo` made `typo` a home
    (its run folder, a client key) before failing."""
    done = cli(tmp_path / "home", "up", env={"MEMBUS_WORKERS": "lmdb,chromadb"}, timeout=60.0)
    assert done.returncode == 2 and "'chromadb'" in done.stderr and "MEMBUS_WORKERS" in done.stderr, done.stderr
    typo = tmp_path / "typo"
    done = cli(typo, "status", timeout=60.0)
    assert done.returncode == 1 and "no membus home" in done.stderr and not typo.exists(), done.stderr


def test_a_request_nothing_takes_says_so_before_it_waits_and_a_timeout_below_zero_is_a_usage_error(
        broker: BrokerProcess) -> None:
    """It waited out its timeout in silence; a negative timeout exited 1, as if the bus had failed."""
    done = cli(broker.home.path, "request", "no.such.request", "{}", "--timeout", "0.5")
    assert done.returncode == 3 and "no consumer group takes no.such.request" in done.stderr, done.stderr
    done = cli(broker.home.path, "request", "no.such.request", "{}", "--timeout", "-1")
    assert done.returncode == 2, done.stderr


def test_a_request_only_analytics_records_says_no_worker_answers_it_and_names_the_close_ones(
        broker: BrokerProcess) -> None:
    """`membus request memory.search.request` waited out its timeout in silence: the duckdb worker's group takes
    every request (it records them), so the note about a topic nothing takes never showed."""
    worker = WorkerProcess(broker.home.path, "duckdb").start()
    try:
        done = cli(broker.home.path, "request", "memory.search.request", "{}", "--timeout", "0.5")
        assert done.returncode == 3 and "no worker answers memory.search.request" in done.stderr, done.stderr
        assert "Did you mean memory.search.text.request, memory.search.hybrid.request or" in done.stderr, done.stderr
        done = cli(broker.home.path, "request", "analytics.messages_per_day.request", "{}", "--timeout", "30")
        assert done.returncode == 0 and "note" not in done.stderr, done.stderr  # one the worker answers
    finally:
        assert worker.stop() == 0, worker.log_tail()


def test_a_line_of_stdin_that_breaks_the_topics_contract_is_named_by_its_number(broker: BrokerProcess) -> None:
    good = '{"user_id": "u1", "text": "likes tea"}'
    done = cli(broker.home.path, "publish", "memory.store.request", "-",
               stdin=f"{good}\n\n{good}\n{{\"user_id\": \"u1\"}}\n")
    assert done.returncode == 1 and "line 4 of stdin" in done.stderr and "text" in done.stderr, done.stderr


def test_status_says_why_a_worker_ended(broker: BrokerProcess) -> None:
    """A worker that could not open its store (restarted again and again by `membus up`) showed as stopped,
    with no reason."""
    store = broker.home.data_dir("libsql")
    store.mkdir(parents=True)
    (store / "membus.db").write_bytes(b"this is not a database " * 200)
    done = cli(broker.home.path, "worker", "libsql", timeout=120.0)
    assert done.returncode == 1, done.stderr
    # under `membus up` the four workers share one stream: the error names which one it is
    assert "error: worker libsql: " in done.stderr and "not a database" in done.stderr, done.stderr
    status = cli(broker.home.path, "status", timeout=60.0)
    said = " ".join(status.stdout.split())
    assert status.returncode == 0 and "worker libsql ended:" in said and "not a database" in said, status.stdout


def test_status_shows_why_a_worker_ended_with_its_brackets(broker: BrokerProcess) -> None:
    """Rich read "[stores.chroma]" in a worker's error as markup: status said "embedding_model in  of membus.toml",
    and an error with "[/...]" in it made status fail with a MarkupError."""
    done = cli(broker.home.path, "worker", "chroma", timeout=120.0,
               env={"MEMBUS_EMBEDDING_MODEL": "no-such-model-[/v9]"})
    assert done.returncode == 1, done.stderr
    status = cli(broker.home.path, "status", timeout=60.0)
    said = " ".join(status.stdout.split())
    assert status.returncode == 0 and "worker chroma ended:" in said, status.stdout + status.stderr
    assert "'no-such-model-[/v9]'" in said and "embedding_model in [stores.chroma] of membus.toml" in said, said
