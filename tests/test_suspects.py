"""The marker a worker keeps of what it is applying (workers/suspects.py); the whole story, with a worker that
kills itself, is in test_worker_contract.py."""

from __future__ import annotations

from pathlib import Path

from workers.suspects import RECORD, ApplyingMarker, Suspects


def test_a_range_left_marked_is_found_by_the_next_run_with_one_more_death(tmp_path: Path) -> None:
    first = ApplyingMarker(tmp_path / "lmdb.applying")
    assert first.open() is None  # a first run
    first.mark(10, 500, 0, 300)
    first.close()  # the process ended with the range marked
    second = ApplyingMarker(tmp_path / "lmdb.applying")
    suspects = second.open()
    assert suspects == Suspects(10, 500, 1, 300)
    assert suspects.holds(10) and suspects.holds(500) and not suspects.holds(501)
    assert suspects.deaths_of(10) == 0  # a range: no message in it has ended a process alone
    second.mark(42, 42, 0, 1)
    second.close()
    third = ApplyingMarker(tmp_path / "lmdb.applying")
    assert (suspects := third.open()) is not None and suspects.deaths_of(42) == 1
    third.close()


def test_a_cleared_marker_suspects_nothing_and_keeps_its_size(tmp_path: Path) -> None:
    marker = ApplyingMarker(tmp_path / "lmdb.applying")
    marker.open()
    marker.mark(1, 2, 0, 2)
    marker.clear()
    marker.close()
    assert (tmp_path / "lmdb.applying").stat().st_size == RECORD  # overwritten in place, never truncated
    assert ApplyingMarker(tmp_path / "lmdb.applying").open() is None


def test_a_marker_that_cannot_be_written_is_given_up_without_stopping_the_worker(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the marker's folder should be")
    marker = ApplyingMarker(tmp_path / "blocker" / "lmdb.applying")
    assert marker.open() is None
    marker.mark(1, 2, 0, 2)  # no error: only crash isolation is lost
    marker.clear()
    marker.close()
