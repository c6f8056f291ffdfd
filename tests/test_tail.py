"""The broker's tail cache: records kept per landed batch, read back by seq, oldest batches dropped first."""

from __future__ import annotations

from bus.tail import TailCache


def _batch(first: int, n: int, size: int = 10) -> tuple[int, list[str], list[bytes]]:
    seqs = range(first, first + n)
    return first, [f"t.{seq}.changed" for seq in seqs], [(b"%d:" % seq).ljust(size, b"x") for seq in seqs]


def test_records_are_read_in_order_across_batches_from_any_seq_with_a_limit() -> None:
    tail = TailCache(1 << 20)
    for first, n in ((1, 3), (4, 1), (5, 4)):
        tail.add(*_batch(first, n))
    assert (tail.first, tail.last, len(tail)) == (1, 8, 8)
    assert [seq for seq, _, _ in tail.scan(1, 100)] == list(range(1, 9))
    assert [(seq, topic) for seq, topic, _ in tail.scan(3, 3)] == [(3, "t.3.changed"), (4, "t.4.changed"),
                                                                   (5, "t.5.changed")]
    assert [body for _, _, body in tail.scan(8, 10)] == [b"8:xxxxxxxx"]
    assert list(tail.scan(9, 10)) == [] and not tail.covers(9) and tail.covers(1) and not tail.covers(0)


def test_over_its_budget_the_oldest_batches_go_first() -> None:
    tail = TailCache(100)
    tail.add(*_batch(1, 5))  # 50 bytes
    tail.add(*_batch(6, 5))  # 100
    assert tail.first == 1 and tail.bytes == 100
    tail.add(*_batch(11, 2))  # 120: the oldest batch goes, whole
    assert (tail.first, tail.last, tail.bytes) == (6, 12, 70)
    assert list(tail.scan(3, 10)) == []  # below the cache: the caller reads the log
    tail.add(*_batch(13, 20, size=20))  # one batch over the budget on its own is not kept
    assert (len(tail), tail.bytes, tail.first, tail.last) == (0, 0, 0, -1)


def test_a_batch_that_does_not_follow_on_starts_the_cache_over() -> None:
    tail = TailCache(1 << 20)
    tail.add(*_batch(1, 3))
    tail.add(*_batch(10, 2))
    assert (tail.first, tail.last) == (10, 11)
    assert [seq for seq, _, _ in tail.scan(10, 5)] == [10, 11]
