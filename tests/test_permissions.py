"""Per-module topic permissions: enforced by the broker, refusals typed and audited in the log."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bus.client import Bus
from bus.permissions import covers
from contracts.errors import BusError, NotAuthorized
from tests.conftest import BrokerProcess, wait_until
from tests.workers_util import cli

RULES = """
[default]
publish = ["app.>"]
subscribe = ["app.>"]

[modules.companion]
publish = ["notes.>", "app.>"]
subscribe = [">"]
"""


@pytest.mark.parametrize(("allowed", "requested", "ok"), [
    (">", "a.b", True), ("a.>", "a.b.c", True), ("a.>", "a.*", True), ("a.>", "a", False),
    ("a.*", "a.b", True), ("a.*", "a.*", True), ("a.b", "a.*", False), ("a.*", "a.>", False),
    ("a.*.c", "a.x.c", True), ("a.*.c", "a.x.d", False), ("a.>", ">", False),
])
def test_pattern_coverage(allowed: str, requested: str, ok: bool) -> None:
    assert covers(allowed, requested) is ok


def test_a_module_may_only_use_its_topics_and_refusals_are_audited(broker: BrokerProcess) -> None:
    (broker.home.path / "permissions.toml").write_text(RULES)
    with Bus.connect(broker.home.path, module="guest") as guest, \
            Bus.connect(broker.home.path, module="companion") as companion:
        assert guest.publish("app.note.changed", {"ok": 1}) > 0
        with pytest.raises(NotAuthorized) as info:
            guest.publish("notes.note.changed", {"sneaky": True})
        assert "guest" in info.value.message and "notes.note.changed" in info.value.message
        with pytest.raises(BusError) as reserved:
            companion.publish("security.access.denied", {"fake": True})
        assert reserved.value.code == "not_authorized"
        with guest.subscribe("memory.>") as sub, pytest.raises(NotAuthorized):
            sub.get(timeout=5)
        with pytest.raises(NotAuthorized):
            list(guest.replay(topic="notes.>"))
        with guest.consume("spy", ["memory.>"]) as c, pytest.raises(NotAuthorized):
            c.fetch(timeout=5)
        assert companion.publish("notes.note.changed", {"fine": True}) > 0
        audit = [m.payload for m in companion.replay(topic="security.>")]
        assert {(a["module"], a["action"]) for a in audit} >= {("guest", "publish"), ("guest", "subscribe")}
        assert all(m.source == "broker" for m in companion.replay(topic="security.>"))
        assert companion.status()["counters"]["unauthorized"] >= 4


def test_a_permissions_file_broken_while_running_keeps_the_rules_read_before(broker: BrokerProcess) -> None:
    """Broken TOML (or a table where a list belongs) used to refuse every publish, as 'the event log could not
    be written'. The rules read before stay in force, and status says what is wrong with the file."""
    path = broker.home.path / "permissions.toml"
    path.write_text(RULES)
    with Bus.connect(broker.home.path, module="guest") as guest:
        assert guest.publish("app.note.changed", {"ok": 1}) > 0
        broken = ['[default]\npublish = ["app.>"\n', "modules = 5\n", '[default]\npublish = "app.>"\n']
        for i, text in enumerate(broken, start=1):
            path.write_text(text)
            os.utime(path, (time.time(), time.time() + i))  # a new modification time: the file is read again
            assert guest.publish("app.note.changed", {"ok": 2}) > 0
            with pytest.raises(NotAuthorized):
                guest.publish("notes.note.changed", {"sneaky": True})
            assert "cannot be read as permissions" in guest.status()["permissions_error"]
        path.write_text(RULES.replace('"app.>"', '"app.>", "notes.>"', 1))
        os.utime(path, (time.time(), time.time() + 10))
        assert guest.publish("notes.note.changed", {"allowed": True}) > 0
        assert guest.status()["permissions_error"] == ""


def test_a_broker_whose_permissions_file_is_broken_does_not_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "permissions.toml").write_text("[default]\npublish = [\n")
    done = cli(home, "broker", timeout=60.0)
    assert done.returncode == 1 and "cannot be read as permissions" in done.stderr, done.stderr


def test_status_shows_a_broken_permissions_file_without_waiting_for_traffic(broker: BrokerProcess) -> None:
    """`permissions_error` stayed empty until some publish or subscribe made the broker read the file again."""
    path = broker.home.path / "permissions.toml"
    path.write_text(RULES)
    with Bus.connect(broker.home.path, module="guest") as guest:
        assert guest.publish("app.note.changed", {"ok": 1}) > 0
        path.write_text("modules = 5\n")
        os.utime(path, (time.time(), time.time() + 1))
        wait_until(lambda: "cannot be read" in guest.status()["permissions_error"], timeout=10.0,
                   what="status naming the broken file")
