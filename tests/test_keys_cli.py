"""`membus keys init|status|change-passphrase|rotate`, and a rotation proven on a home with data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest
from typer.testing import CliRunner

from bus import keys
from bus.cli import app
from bus.home import Home
from bus.keys import Argon2Params
from bus.log import EventLog
from bus.sealing import KeyRingCipher
from contracts.errors import IntegrityError
from tests.workers_util import System, cli
from workers.libsql import DB_FILE, connect, file_key

runner = CliRunner()
SECRET = "quokkamarmalade"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in (keys.ENV_PASSPHRASE, keys.ENV_PASSPHRASE_FILE, keys.ENV_KEY_FILE, keys.ENV_KEY_FD,
                 "MEMBUS_ENCRYPTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    before = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())  # type: ignore[no-untyped-call]
    yield
    keyring.set_keyring(before)


def test_init_without_passphrase_then_status(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = runner.invoke(app, ["keys", "init", "--no-passphrase", "--home", str(home)])
    assert done.exit_code == 0, done.output
    assert "key-file" in done.output
    status = runner.invoke(app, ["keys", "status", "--json", "--home", str(home)])
    report = json.loads(status.stdout)
    assert report["source"] == "key-file" and report["generation"] == 1 and report["encryption"] is True
    again = runner.invoke(app, ["keys", "init", "--no-passphrase", "--home", str(home)])
    assert again.exit_code == 1 and "already has keys" in again.output


def test_change_passphrase_keeps_the_master_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    before = keys.init(home, "old secret", params=Argon2Params(64, 1, 1), remember=False)
    done = runner.invoke(app, ["keys", "change-passphrase", "--home", str(home)],
                         input="old secret\nnew secret\nnew secret\n")
    assert done.exit_code == 0, done.output
    after = keys.load_master_key(home, passphrase="new secret")
    assert (after.key, after.key_id) == (before.key, before.key_id)
    wrong = runner.invoke(app, ["keys", "change-passphrase", "--home", str(home)],
                          input="old secret\nx\nx\n")
    assert wrong.exit_code == 4


def test_rotate_refuses_while_the_broker_runs(tmp_path: Path) -> None:
    with System(tmp_path / "home") as system:
        done = runner.invoke(app, ["keys", "rotate", "--home", str(system.home)])
    assert done.exit_code == 1 and "stop membus first" in done.output


def test_rotate_reencrypts_everything_readable_after_and_not_with_the_old_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with System(home) as system:
        system.worker("libsql")
        system.worker("lmdb")
        system.bus.request("conversation.message.append.request", {
            "conversation_id": "c1", "user_id": "u1", "role": "user", "text": f"a {SECRET} jar",
            "message_id": "m1", "metadata": {"note": SECRET}})
        assert system.bus.request("working.recent.request", {"conversation_id": "c1"}).payload.messages
    old = keys.load_master_key(home)

    done = runner.invoke(app, ["keys", "rotate", "--home", str(home)])
    assert done.exit_code == 0, done.output
    assert "rebuilt from the log at next start: lmdb" in done.output
    new = keys.load_master_key(home)
    assert new.generation == old.generation + 1

    # the old key alone opens nothing: the log, the libSQL file
    event_log = EventLog(Home(home).log_dir, cipher=KeyRingCipher(old.keyring(keys.LOG_LABEL)))
    event_log.open()
    try:
        with pytest.raises(IntegrityError):
            event_log.get(1)
    finally:
        event_log.close()
    with pytest.raises(ValueError, match="not a database"):
        conn = connect(Home(home).data_dir("libsql") / DB_FILE, file_key(old.keyring("store:libsql")))
        conn.execute("SELECT count(*) FROM messages").fetchall()

    # everything is readable with the new generation, and the rebuilt store has the message again
    with System(home) as system:
        system.worker("libsql")
        system.worker("lmdb")
        history = system.bus.request("conversation.history.request", {"conversation_id": "c1"}).payload
        assert [m.text for m in history.messages] == [f"a {SECRET} jar"]
        assert history.messages[0].metadata == {"note": SECRET}
        recent = system.bus.request("working.recent.request", {"conversation_id": "c1"}).payload
        assert [m.text for m in recent.messages] == [f"a {SECRET} jar"]
        hits = system.bus.request("memory.search.text.request", {"query": SECRET}).payload
        assert [h.id for h in hits.hits] == ["m1"]


def test_rotate_refuses_while_membus_up_runs_even_between_restarts_of_its_children(tmp_path: Path) -> None:
    """With its children in restart back-off, rotate ran, and the supervisor then restarted them with the keys
    of the old generation: every one crash-looped."""
    home = tmp_path / "home"
    keys.init(home, None)
    Home(home).write_supervisor_file()  # this test process plays a `membus up` whose children are all down
    done = runner.invoke(app, ["keys", "rotate", "--home", str(home)])
    assert done.exit_code == 1 and "stop membus first" in done.output and "membus up (pid" in done.output
    Home(home).remove_supervisor_file()
    assert runner.invoke(app, ["keys", "rotate", "--home", str(home)]).exit_code == 0


def test_membus_up_refuses_encryption_off_in_an_encrypted_home(tmp_path: Path) -> None:
    """It logged requests in plaintext beside the sealed records, and every worker crash-looped."""
    home = tmp_path / "home"
    keys.init(home, None)
    done = cli(home, "up", "--workers", "lmdb", env={"MEMBUS_ENCRYPTION": "0"}, timeout=60.0)
    assert done.returncode == 1 and "is encrypted" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (home / "log").exists()


def test_migrate_takes_home_after_its_command_and_never_writes_a_store_without_keys(tmp_path: Path) -> None:
    """`migrate up` on a new home wrote a plaintext libSQL file that the worker, once keys existed, could not
    open (it restarted for ever); and `migrate status --home H` was "No such option"."""
    home = tmp_path / "home"
    done = cli(home, "migrate", "up")
    assert done.returncode == 1 and "no keys yet" in done.stderr, done.stderr
    assert not (Home(home).data_dir("libsql") / DB_FILE).exists()
    keys.init(home, None)
    done = cli(home, "migrate", "up")
    assert done.returncode == 0 and "core: applied 1, 2, 3" in done.stdout, done.stderr
    assert not (Home(home).data_dir("libsql") / DB_FILE).read_bytes().startswith(b"SQLite format 3")
    done = cli(home, "migrate", "status", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["current"] == 3, done.stderr


def test_migrate_with_a_wrong_passphrase_exits_4_like_every_command(tmp_path: Path) -> None:
    home = tmp_path / "home"
    keys.init(home, "right passphrase", params=Argon2Params(64, 1, 1), remember=False)
    done = cli(home, "migrate", "up", env={keys.ENV_PASSPHRASE: "wrong"})
    assert done.returncode == 4 and "Traceback" not in done.stderr, done.stderr
    assert not (Home(home).data_dir("libsql") / DB_FILE).exists()
