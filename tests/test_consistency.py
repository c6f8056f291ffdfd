"""`membus check` and `membus rebuild` against real brokers, real worker processes and real stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bus.client import Bus
from bus.consistency import Difference, Truth, check, confirm, expected_in_working_memory, rebuild
from bus.home import Home
from contracts.errors import NotAuthorized
from contracts.inventory import InventoryItem
from contracts.registry import to_builtins
from tests.conftest import wait_until
from tests.workers_util import REPO, System, child_env, publish_all
from workers.lmdb import boot_id

pytestmark = pytest.mark.timeout(600)
ALL = ("libsql", "lmdb", "duckdb", "chroma")


def traffic(bus: Bus, tag: str, *, messages: int = 6, facts: int = 3) -> list[str]:
    """A conversation, facts (one superseded), feedback and session context; returns the fact ids."""
    for i in range(messages):
        bus.request("conversation.message.append.request",
                    {"conversation_id": f"c-{tag}", "user_id": "u1", "role": "user" if i % 2 == 0 else "assistant",
                     "text": f"{tag} message {i} about hiking and mountains", "sentiment": (i % 3) / 2 - 0.5},
                    timeout=60)
    ids = [bus.request("memory.store.request", {"user_id": "u1", "text": f"{tag} fact {i}: likes trail {i}"},
                       timeout=60).payload.fact_id for i in range(facts)]
    bus.request("memory.fact.update.request", {"fact_id": ids[0], "text": f"{tag} fact 0: loves trail 0"},
                timeout=60)
    bus.request("feedback.record.request", {"user_id": "u1", "event_type": "thumbs", "reward": 1}, timeout=60)
    bus.request("working.context.set.request", {"session_id": f"s-{tag}", "key": "mood", "value": tag}, timeout=60)
    return ids


def membus(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus", *args, "--home", str(home)], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_check_is_clean_after_traffic_and_names_the_ids_a_stopped_store_lacks(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with System(home) as s:
        for name in ALL:
            s.worker(name)
        traffic(s.bus, "a")
        done = membus(home, "check", "--json", "--timeout", "120")
        report = json.loads(done.stdout)
        assert done.returncode == 0, done.stdout + done.stderr
        assert report["ok"] and {st["name"] for st in report["stores"]} == set(ALL)
        # positions read after the log settled, not from a status file written before the traffic
        assert all(0 < st["position"] <= report["head"] for st in report["stores"]), report["stores"]
        counts = {st["name"]: st["counts"] for st in report["stores"]}
        assert counts["libsql"] == {"facts": 4, "messages": 6, "feedback": 1}
        assert counts["chroma"] == {"memory": 3, "conversation": 6}  # the superseded fact is not indexed
        assert counts["duckdb"] == {"messages": 6, "facts": 4, "feedback": 1}
        assert counts["lmdb"] == {"messages": 6, "cleared": 0}  # conversations cleared (none here)

        s.workers["chroma"].stop()
        new = traffic(s.bus, "b", messages=2, facts=2)
        lagging = check(s.bus, Home(home), timeout=2.0)
        assert not lagging.ok
        chroma = {d.problem: d for d in lagging.differences if d.store == "chroma" and d.kind != "messages"}
        assert chroma["not running"].count > 0  # its group has messages waiting
        not_applied = next(d for d in lagging.differences
                           if d.store == "chroma" and d.kind == "facts" and d.problem == "not applied")
        assert set(new) <= set(not_applied.ids)
        assert all(d.store == "chroma" for d in lagging.differences), lagging.differences
        cli = membus(home, "check", "--timeout", "2")
        assert cli.returncode == 1 and "chroma" in cli.stdout and new[1] in cli.stdout

        s.worker("chroma")
        again = check(s.bus, Home(home), timeout=120.0)
        assert again.ok, again.differences


@pytest.mark.skipif(boot_id() is None, reason="no boot id here: every commit is synced")
def test_an_lmdb_store_left_unsynced_before_an_os_restart_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    """Its commits are not synced one by one: after an OS crash its file is not trusted; the log gives it back."""
    home = tmp_path / "home"
    with System(home) as s:
        for name in ("libsql", "lmdb"):
            s.worker(name)
        traffic(s.bus, "a")
        s.workers["lmdb"].stop()
        store = Home(home).data_dir("lmdb")
        (store / "unsynced").write_text("an-earlier-boot")  # as if the machine died while it ran,
        (store / "data.mdb").write_bytes(os.urandom(64 * 1024))  # with its pages written in any order
        s.worker("lmdb")
        wait_until(lambda: not (store / "unsynced").exists(), timeout=120)  # caught up, idle, flushed
        recent = s.bus.request("working.recent.request", {"conversation_id": "c-a"}, timeout=60).payload
        assert [m.text for m in recent.messages] == [f"a message {i} about hiking and mountains" for i in range(6)]
        assert s.bus.request("working.context.get.request", {"session_id": "s-a"}, timeout=60).payload.values == \
            {"mood": "a"}
        report = check(s.bus, Home(home), timeout=120.0)
        assert report.ok, report.differences


def test_check_names_ids_a_store_really_lacks(tmp_path: Path) -> None:
    """A chroma store that lost an index entry (removed behind libsql's back) is named with the id."""
    home = tmp_path / "home"
    with System(home) as s:
        for name in ALL:
            s.worker(name)
        facts = traffic(s.bus, "a", messages=2, facts=2)
        s.bus.request("semantic.remove.request", {"id": facts[1], "collection": "memory"}, timeout=60)
        report = check(s.bus, Home(home), timeout=120.0)
        missing = [d for d in report.differences if d.problem == "missing"]
        assert [(d.store, d.kind, d.ids) for d in missing] == [("chroma", "facts", [facts[1]])]


def test_kill_9_of_chroma_and_duckdb_during_ingestion_then_check_is_clean(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with System(home) as s:
        for name in ALL:
            s.worker(name)
        n = 400
        seqs = publish_all(s.bus, "conversation.message.append.request",
                           [{"conversation_id": f"k{i % 7}", "user_id": "u1", "role": "user",
                             "message_id": f"m{i:04d}", "text": f"message {i} of the ingestion"} for i in range(n)])
        publish_all(s.bus, "memory.store.request",
                    [{"user_id": "u1", "fact_id": f"f{i:03d}", "text": f"fact number {i}"} for i in range(60)])
        # Kill each while it is part-way: it has applied something, not everything.
        for name in ("duckdb", "chroma"):
            w = s.workers[name]
            wait_until(lambda w=w: int(w.status().get("position", 0)) > 0, timeout=120, what=f"{name} applying")
            w.kill()
        assert seqs[-1] > 0
        for name in ("duckdb", "chroma"):
            s.worker(name)
        report = check(s.bus, Home(home), timeout=240.0)
        assert report.ok, report.differences
        counts = {st.name: st.counts for st in report.stores}
        assert counts["duckdb"]["messages"] == n and counts["chroma"]["conversation"] == n
        assert counts["chroma"]["memory"] == 60 and counts["duckdb"]["facts"] == 60


READS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "libsql": [("conversation.history.request", {"conversation_id": "c-a"}),
               ("memory.facts.request", {"user_id": "u1", "include_superseded": True}),
               ("memory.search.text.request", {"query": "hiking"}),
               ("structured.inventory.request", {"kind": "messages"})],
    "lmdb": [("working.recent.request", {"conversation_id": "c-a"}),
             ("working.context.get.request", {"session_id": "s-a"}),
             ("working.inventory.request", {})],
    "chroma": [("memory.search.semantic.request", {"query": "which trail does the user like", "k": 10}),
               ("memory.search.hybrid.request", {"query": "hiking mountains", "collection": "all", "k": 10}),
               ("semantic.inventory.request", {"kind": "conversation"})],
    "duckdb": [("analytics.messages_per_day.request", {}),
               ("analytics.sentiment.request", {"conversation_id": "c-a"}),
               ("analytics.latency.request", {"topic": "memory.store.request"}),
               ("analytics.throughput.request", {"topic": "memory.store.request"}),
               ("analytics.inventory.request", {"kind": "facts"})],
}


def answers(bus: Bus, store: str) -> list[Any]:
    return [rounded(to_builtins(bus.request(topic, payload, timeout=120).payload)) for topic, payload in READS[store]]


def rounded(value: Any) -> Any:
    """Embeddings of a batch may differ from those of single texts in the last bits: compare scores to 1e-5."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


RESULTS = (".changed", ".complete", ".failed")


def test_rebuild_of_each_store_gives_the_same_answers_and_no_duplicate_messages(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with System(home) as s:
        for name in ALL:
            s.worker(name)
        traffic(s.bus, "a", messages=8, facts=4)
        assert check(s.bus, Home(home), timeout=120.0).ok
        for store in ALL:
            before = answers(s.bus, store)
            head = s.bus.status()["head"]
            ids_before = {m.id for m in s.bus.replay(to_seq=head)}
            if store == "lmdb":  # once through the command line, with its progress bar
                done = membus(home, "rebuild", store, "--yes")
                assert done.returncode == 0, done.stdout + done.stderr
                assert "rebuilt" in done.stdout
            else:
                result = rebuild(s.bus, Home(home), store, timeout=240.0)
                assert result.position > 0 and result.stopped_pid == s.workers[store].proc.pid  # type: ignore[union-attr]
            # the worker was stopped for the rebuild (it releases its store lock just before it exits)
            wait_until(lambda w=s.workers[store]: not w.alive, timeout=30, what=f"{store} worker exited")
            s.worker(store)
            assert answers(s.bus, store) == before, store
            # Replayed requests republish their replies and change events under the same ids: stored once.
            later = [m for m in s.bus.replay(from_seq=head + 1) if m.topic.endswith(RESULTS)]
            assert not [m for m in later if m.causation_id in ids_before], store
        report = check(s.bus, Home(home), timeout=120.0)
        assert report.ok, report.differences


def test_a_worker_waits_while_its_store_is_being_rebuilt(tmp_path: Path) -> None:
    """The rebuild flag keeps a (re)started worker away from the store until it is removed."""
    home = tmp_path / "home"
    with System(home) as s:
        flag = Home(home).path / "run" / "rebuild-lmdb"
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text(str(s.broker.proc.pid))  # type: ignore[union-attr]  # any live process
        w = s.worker("lmdb", wait=False)
        wait_until(lambda: "worker.waiting_for_store" in w.log_tail(), timeout=60, what="the worker waiting")
        assert w.alive and not s.bus.status()["groups"].get("lmdb", {}).get("members")
        flag.unlink()
        wait_until(lambda: s.bus.status()["groups"].get("lmdb", {}).get("members"), timeout=60,
                   what="the worker joining")


def test_working_memory_expectation_follows_ttl_and_window() -> None:
    now = 1_000_000.0
    truth = Truth(facts={}, feedback={}, messages={
        "old": InventoryItem("old", "c1", now - 100_000), "a": InventoryItem("a", "c1", now - 30),
        "b": InventoryItem("b", "c1", now - 20), "c": InventoryItem("c", "c1", now - 10),
        "other": InventoryItem("other", "c2", now - 5)})
    held = [InventoryItem("b", "tok1", now - 20), InventoryItem("c", "tok1", now - 10)]
    info = {"ttl_seconds": 86_400.0, "max_messages": 2.0}
    # c1's window is full (2 held): only what is newer than its oldest held message is expected;
    # c2 holds nothing, so its message is expected; "old" has expired.
    assert expected_in_working_memory(truth, held, info, now) == {"b", "c", "other"}
    assert expected_in_working_memory(truth, held, {**info, "max_messages": 5.0}, now) == {"a", "b", "c", "other"}
    # c2 was cleared after its message was written: working memory is not expected to hold it
    assert expected_in_working_memory(truth, held, info, now, {"c2": now - 1}) == {"b", "c"}
    assert expected_in_working_memory(truth, held, info, now, {"c2": now - 6}) == {"b", "c", "other"}


def test_check_without_the_structured_store_is_not_called_consistent(tmp_path: Path) -> None:
    """With nothing to compare the other stores with, check said every store agreed."""
    with System(tmp_path / "home") as s:
        s.worker("lmdb")
        report = check(s.bus, Home(s.home), timeout=30)
        assert not report.ok
        assert [(d.store, d.problem) for d in report.differences] == [("libsql", "not running")]


def test_check_by_a_module_the_permissions_do_not_let_ask_fails_instead_of_naming_differences(tmp_path: Path) -> None:
    """With a permissions file that does not list ``cli``, ``membus check`` exited 1 with "differs lmdb: 0
    inventory unanswered (module 'cli' may not publish ...)": stores called different that nobody had asked."""
    with System(tmp_path / "home") as s:
        s.worker("lmdb")
        (s.home / "permissions.toml").write_text('[modules.test]\npublish = [">"]\nsubscribe = [">"]\n')
        with Bus.connect(s.home, module="cli") as cli, pytest.raises(NotAuthorized, match="may not publish"):
            check(cli, Home(s.home), timeout=30)


def test_status_shows_a_caught_up_worker_without_lag_and_a_stopped_one_as_stopped(tmp_path: Path) -> None:
    """A worker's own position stays at the last message of its topics: other traffic showed as its lag. And a
    worker whose process had ended was shown with its old pid, like a live one."""
    with System(tmp_path / "home") as s:
        s.worker("lmdb")
        publish_all(s.bus, "app.note.changed", [{"i": i} for i in range(50)])
        wait_until(lambda: s.bus.status()["groups"]["lmdb"]["lag"] == 0, what="the lmdb group caught up")

        def lmdb_row() -> list[str]:
            shown = subprocess.run([sys.executable, "-m", "bus", "status", "--home", str(s.home)], env=child_env(),
                                   cwd=REPO, capture_output=True, text=True, timeout=60).stdout
            return [line.split() for line in shown.splitlines() if line.split()[:1] == ["lmdb"]][-1]  # workers last

        wait_until(lambda: lmdb_row()[3] == "0", timeout=20, what="the worker's row with lag 0")
        s.workers["lmdb"].stop()
        assert lmdb_row()[1] == "stopped"


def test_a_fact_superseded_between_the_two_listings_is_not_reported_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under traffic, a fact superseded after libSQL was listed and before DuckDB was showed as stale in DuckDB:
    a difference no store had. The second listing of libSQL explains it (logic only: the listings are given)."""
    def facts(**current: bool) -> Truth:
        return Truth({i: InventoryItem(id=i, current=c) for i, c in current.items()}, {}, {})

    first, later = facts(f1=True, f2=True), facts(f1=False, f2=True)
    monkeypatch.setattr(Truth, "fetch", classmethod(lambda cls, bus, timeout: later))
    found = [Difference("duckdb", "facts", "stale", 2, ["f1", "f2"], "superseded in one store only")]
    assert [(d.count, d.ids) for d in confirm(None, found, 1.0, first)] == [(1, ["f2"])]
