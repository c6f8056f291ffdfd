"""The semantic-memory worker against real ChromaDB and SQLite files, and the real embedding model."""

from __future__ import annotations

import itertools
import math
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import contracts.semantic
import contracts.structured  # noqa: F401  (the real memory.fact.changed contract)
from contracts.envelope import Envelope, make_envelope
from contracts.errors import StoreError, StoreRejected
from contracts.registry import encode_payload
from schemas import registry as schema_registry
from workers.apply import apply_batch
from workers.bm25 import SCHEMAS as bm25_schemas
from workers.bm25 import Bm25Index, terms, tokenize
from workers.chroma import ChromaBackend
from workers.embedding import HashEmbedder, load_embedder

CORPUS = {
    "s0": "My sister Anna lives in Berlin and works as a nurse.",
    "s1": "I am allergic to peanuts, so I avoid most desserts.",
    "s2": "Our dog Biscuit is a golden retriever who loves swimming.",
    "s3": "I play the cello in a community orchestra on Thursdays.",
    "s4": "My favourite food is spicy Thai green curry.",
    "s5": "I started learning Japanese last spring for a trip to Kyoto.",
    "s6": "I run a half marathon every autumn to stay fit.",
    "s7": "My laptop is an old ThinkPad that I use for programming in Rust.",
    "s8": "I get anxious before flying, especially during takeoff.",
    "s9": "We are renovating the kitchen with new oak cabinets.",
}
QUERIES = {
    "Where does my sibling live?": "s0",
    "Which foods am I allergic to?": "s1",
    "Tell me about my pet": "s2",
    "Which musical instrument do I play?": "s3",
    "What language am I studying?": "s5",
    "Am I afraid of airplanes?": "s8",
    "What computer do I code on?": "s7",
}


class Log:
    def __init__(self) -> None:
        self.seq = 0

    def env(self, topic: str, payload: Any, *, reply_to: str = "", raw: bool = False) -> Envelope:
        """``raw``: encoded as is, not checked against the contract (a bad message from elsewhere)."""
        self.seq += 1
        body = msgspec.msgpack.encode(payload) if raw else encode_payload(topic, payload)
        env = make_envelope(topic, body, reply_to=reply_to)
        env.seq = self.seq
        return env


def fact(fact_id: str, text: str, user: str = "u1", **extra: Any) -> dict[str, Any]:
    """A `memory.fact.changed` payload exactly as the libSQL worker's contract makes it."""
    when = "2025-06-01T12:00:00Z"
    return {"fact_id": fact_id, "user_id": user, "text": text, "fact_type": "personal", "category": "general",
            "confidence": 0.9, "metadata": {"source": "chat"}, "created_at": when, "last_updated": when,
            "last_accessed": when, "access_count": 0, "version": 1, "superseded_by": None, "supersedes": None,
            "op": "created", "updated_at": when, **extra}


def search(backend: ChromaBackend, log: Log, query: str, *, hybrid: bool = False, **options: Any) -> Any:
    topic = "memory.search.hybrid.request" if hybrid else "memory.search.semantic.request"
    outcomes, _ = apply_batch(backend, [log.env(topic, {"query": query, **options}, reply_to="inbox-1")])
    assert outcomes[0].status == "applied", outcomes[0].error
    return outcomes[0].reply.hits


# -- BM25 ----------------------------------------------------------------------------------------

@pytest.fixture
def bm25() -> Iterator[Bm25Index]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    index = Bm25Index(conn)
    index.create()
    yield index
    conn.close()


def test_tokenize_drops_stopwords_and_case() -> None:
    assert tokenize("The Cat and THE hat!") == ["cat", "hat"]
    assert terms("Cats, cats") == ["cats", "cats"]


def test_bm25_ranks_by_term_rarity_and_frequency(bm25: Bm25Index) -> None:
    bm25.add("m", "a", "tea tea with lemon")
    bm25.add("m", "b", "tea with milk")
    bm25.add("m", "c", "coffee with milk")
    ranked = bm25.search("m", "tea lemon", k=10)
    assert [doc for doc, _ in ranked] == ["a", "b"]  # c shares no term
    assert ranked[0][1] > ranked[1][1] > 0
    # "lemon" (in one document) weighs more than "milk" (in two)
    assert bm25.search("m", "lemon")[0][1] > bm25.search("m", "milk")[0][1]


def test_bm25_incremental_add_replace_remove(bm25: Bm25Index) -> None:
    bm25.add("m", "a", "red apple")
    bm25.add("m", "b", "green apple")
    assert bm25.count("m") == 2
    bm25.add("m", "a", "yellow banana")  # replaces what "a" said before
    assert bm25.count("m") == 2
    assert [doc for doc, _ in bm25.search("m", "apple")] == ["b"]
    assert [doc for doc, _ in bm25.search("m", "banana")] == ["a"]
    assert bm25.remove("m", "b") and not bm25.remove("m", "b")
    assert bm25.search("m", "apple") == []
    assert bm25.conn.execute("SELECT count(*) FROM bm25_terms WHERE term = 'apple'").fetchone() == (0,)
    assert bm25.search("other", "banana") == []  # collections are separate


def bm25_by_hand(docs: dict[str, tuple[str, str]], query: str, user: str | None,
                 k1: float = 1.2, b: float = 0.75) -> dict[str, float]:
    """Okapi BM25 of every document sharing a term with ``query``, from the texts themselves."""
    tokens = {doc: tokenize(text) for doc, (text, _) in docs.items()}
    avg = sum(map(len, tokens.values())) / len(tokens)
    scores: dict[str, float] = {}
    for term in dict.fromkeys(tokenize(query)):
        df = sum(term in t for t in tokens.values())
        if not df:
            continue
        idf = math.log(1.0 + (len(docs) - df + 0.5) / (df + 0.5))
        for doc, t in tokens.items():
            tf = t.count(term)
            if tf and (user is None or docs[doc][1] == user):
                scores[doc] = scores.get(doc, 0.0) + idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t) / avg))
    return scores


WORDS = ["tea", "milk", "lemon", "jazz", "hiking", "berlin", "knees", "coffee", "the", "and"]


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join), min_size=1,
                      max_size=12),
       query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join),
       user=st.sampled_from([None, "u1", "u2"]), k=st.integers(1, 12))
def test_bm25_search_equals_bm25_computed_from_the_texts(texts: list[str], query: str, user: str | None,
                                                         k: int) -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    index = Bm25Index(conn)
    index.create()
    docs = {f"d{i:02}": (text, f"u{i % 2 + 1}") for i, text in enumerate(texts)}
    for doc, (text, owner) in docs.items():
        index.add("m", doc, text, user_id=owner)
    expected = bm25_by_hand(docs, query, user)
    got = index.search("m", query, k=k, user_id=user)
    conn.close()
    assert len(got) == min(k, len(expected))
    assert all(score == pytest.approx(expected[doc], rel=1e-9) for doc, score in got)
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    cutoff = got[-1][1] if got else math.inf
    assert all(expected[doc] <= cutoff * (1 + 1e-9) for doc in set(expected) - {doc for doc, _ in got})


def index_rows(index: Bm25Index) -> list[list[tuple[Any, ...]]]:
    return [index.conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()
            for table in ("bm25_docs", "bm25_postings", "bm25_terms", "bm25_stats")]


@settings(max_examples=60, deadline=None)
@given(changes=st.lists(st.tuples(st.sampled_from(["m", "c"]), st.sampled_from(["a", "b", "c", "d"]),
                                  st.one_of(st.none(), st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join)),
                                  st.sampled_from([None, "u1", "u2"])), max_size=25),
       cuts=st.lists(st.integers(0, 25), max_size=4))
def test_writing_changes_in_batches_gives_the_index_adding_them_one_at_a_time_gives(
        changes: list[tuple[str, str, str | None, str | None]], cuts: list[int]) -> None:
    """Document numbers included (equal scores rank by them), however the changes are cut into batches."""
    one, batched = (Bm25Index(sqlite3.connect(":memory:", isolation_level=None)) for _ in range(2))
    one.create()
    batched.create()
    for collection, doc_id, text, user in changes:
        if text is None:
            one.remove(collection, doc_id)
        else:
            one.add(collection, doc_id, text, user)
    bounds = [0, *sorted(cuts), len(changes)]
    for start, end in itertools.pairwise(bounds):
        batched.write(changes[start:end])
    assert index_rows(batched) == index_rows(one)


def test_an_index_made_before_postings_carried_lengths_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    Bm25Index(conn).create()
    # What the code before version 2 made: no version tables, postings without their document's length,
    # written with that code's statements.
    schema_registry.rollback(conn, "bm25", 1, bm25_schemas)
    conn.executescript("DROP TABLE schema_applied; DROP TABLE schema_history;")
    docs = {f"d{i}": (text, f"u{i % 2 + 1}") for i, text in enumerate(
        ["tea with lemon", "tea tea milk", "jazz in berlin", "hiking knees tea", "coffee coffee jazz"])}
    for doc_id, (text, owner) in docs.items():
        counts = Counter(tokenize(text))
        doc = conn.execute("INSERT INTO bm25_docs (collection, doc_id, user_id, length) VALUES ('m', ?, ?, ?)",
                           (doc_id, owner, sum(counts.values()))).lastrowid
        conn.executemany("INSERT INTO bm25_postings (collection, term, doc, tf) VALUES ('m', ?, ?, ?)",
                         [(term, doc, tf) for term, tf in counts.items()])
        conn.executemany("INSERT INTO bm25_terms (collection, term, df) VALUES ('m', ?, 1) "
                         "ON CONFLICT (collection, term) DO UPDATE SET df = df + 1", [(t,) for t in counts])
        conn.execute("INSERT INTO bm25_stats (collection, docs, total_length) VALUES ('m', 1, ?) ON CONFLICT "
                     "(collection) DO UPDATE SET docs = docs + 1, total_length = total_length + excluded.total_length",
                     (sum(counts.values()),))
    conn.close()

    conn = sqlite3.connect(path, isolation_level=None)
    index = Bm25Index(conn)
    index.create()
    assert [(s.component, s.current) for s in schema_registry.status(conn, bm25_schemas)] == [("bm25", 3)]
    for query, user in [("tea", None), ("tea jazz", "u1"), ("coffee knees berlin", None)]:
        expected = bm25_by_hand(docs, query, user)
        got = index.search("m", query, k=10, user_id=user)
        assert {doc for doc, _ in got} == set(expected)
        assert all(score == pytest.approx(expected[doc], rel=1e-9) for doc, score in got)
    index.add("m", "d9", "tea lemonade")  # written by this code after the migration
    assert index.search("m", "lemonade")[0][0] == "d9"
    conn.close()


def test_cjk_text_is_indexed_as_character_pairs_so_a_word_finds_its_sentence(bm25: Bm25Index) -> None:
    """\\w+ kept a Japanese or Chinese sentence as one token: the keyword half of hybrid search found nothing."""
    assert tokenize("我住在東京都。") == ["我住", "住在", "在東", "東京", "京都"]
    assert tokenize("Tokyo東京2024 と") == ["tokyo", "東京", "2024", "と"]
    assert tokenize("서울에서 만나요") == ["서울", "울에", "에서", "만나", "나요"]
    bm25.add("m", "ja", "昨日は友達と寿司を食べました")
    bm25.add("m", "zh", "我喜欢在东京吃寿司")
    bm25.add("m", "en", "sushi in Tokyo")
    assert {doc for doc, _ in bm25.search("m", "寿司")} == {"ja", "zh"}
    assert [doc for doc, _ in bm25.search("m", "东京")] == ["zh"]


def made_before_cjk_pairs(backend: ChromaBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes ``backend``'s BM25 index what the code before version 3 made: version 2, every text indexed with
    that code's tokenizer (a CJK sentence one token)."""
    import re

    from workers import bm25 as bm25_module

    conn = backend.conn
    schema_registry.rollback(conn, "bm25", 2, bm25_schemas)
    with monkeypatch.context() as patched:
        patched.setattr(bm25_module, "tokenize",
                        lambda text: [w for w in re.findall(r"\w+", text.lower()) if w not in bm25_module.STOPWORDS])
        for kind in ("memory", "conversation"):
            got = backend.collection(kind).get(include=["documents", "metadatas"])
            for doc_id, document, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
                text, metadata = backend._opened(kind, doc_id, document, meta)
                assert backend.bm25 is not None
                backend.bm25.add(kind, doc_id, text, metadata.get("user_id"))


def check_cjk_reindexed_at_open(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make()
    backend.open()
    log = Log()
    apply_batch(backend, [log.env("memory.fact.changed", fact("f1", "昨日は友達と寿司を食べました")),
                          log.env("memory.fact.changed", fact("f2", "plays the cello"))])
    made_before_cjk_pairs(backend, monkeypatch)
    assert backend.bm25 is not None and backend.bm25.search("memory", "寿司") == []
    backend.close()
    backend = make()
    backend.open()  # the first start after the upgrade indexes the CJK text again
    try:
        assert backend.bm25 is not None and not backend.bm25.retokenize_pending()
        assert [doc for doc, _ in backend.bm25.search("memory", "寿司")] == ["f1"]
        assert [doc for doc, _ in backend.bm25.search("memory", "cello")] == ["f2"]
        assert search(backend, log, "寿司", hybrid=True)[0].id == "f1"
    finally:
        backend.close()


def test_an_index_made_before_cjk_pairs_is_indexed_again_once_at_open(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    check_cjk_reindexed_at_open(lambda: ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder()), monkeypatch)


def test_bm25_filters_by_user(bm25: Bm25Index) -> None:
    bm25.add("m", "a", "likes jazz", user_id="u1")
    bm25.add("m", "b", "likes jazz", user_id="u2")
    assert [doc for doc, _ in bm25.search("m", "jazz", user_id="u2")] == ["b"]


# -- search quality with the real model ----------------------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChromaBackend, Log]]:
    backend = ChromaBackend(tmp_path_factory.mktemp("chroma-real"), embedder=load_embedder(device="cpu"))
    backend.open()
    log = Log()
    batch = [log.env("memory.fact.changed", fact(fid, text)) for fid, text in CORPUS.items()]
    batch.append(log.env("memory.fact.changed", fact("other", "My brother lives in Berlin too.", user="u2")))
    outcomes, _ = apply_batch(backend, batch)
    assert {o.status for o in outcomes} == {"applied"}
    yield backend, log
    backend.close()


@pytest.mark.parametrize("hybrid", [False, True], ids=["semantic", "hybrid"])
def test_related_sentence_ranks_first(real: tuple[ChromaBackend, Log], hybrid: bool) -> None:
    backend, log = real
    for query, expected in QUERIES.items():
        hits = search(backend, log, query, hybrid=hybrid, user_id="u1", k=3)
        assert hits and hits[0].id == expected, (query, [(h.id, h.score) for h in hits])
        assert hits[0].text == CORPUS[expected]
        assert hits[0].metadata["user_id"] == "u1"
        assert all(h.metadata["user_id"] == "u1" for h in hits)


def test_threshold_and_scores(real: tuple[ChromaBackend, Log]) -> None:
    backend, log = real
    hits = search(backend, log, "Which musical instrument do I play?", user_id="u1", k=10)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    strict = search(backend, log, "Which musical instrument do I play?", user_id="u1", k=10,
                    min_relevance=hits[0].score - 1e-6)
    assert [h.id for h in strict] == ["s3"]
    hybrid = search(backend, log, "cello orchestra", hybrid=True, user_id="u1", k=3,
                    where={"fact_type": "personal"})
    assert hybrid[0].id == "s3" and hybrid[0].bm25 is not None and hybrid[0].semantic is not None


def test_hybrid_keyword_hits_of_another_user_stay_out(real: tuple[ChromaBackend, Log]) -> None:
    backend, log = real
    # "brother" is only in u2's fact: for u1 it is a keyword hit of nobody's, for u2 the best one
    mine = search(backend, log, "brother Berlin", hybrid=True, user_id="u1", k=10, candidates=10)
    assert "other" not in [h.id for h in mine] and {h.metadata["user_id"] for h in mine} == {"u1"}
    theirs = search(backend, log, "brother Berlin", hybrid=True, user_id="u2", k=10)
    assert [h.id for h in theirs] == ["other"] and theirs[0].bm25 is not None
    everyone = search(backend, log, "brother Berlin", hybrid=True, k=10)
    assert {"other", "s0"} <= {h.id for h in everyone}


# -- exactly-once, reopen, superseded facts (the hashing embedder: no semantics needed) -------------

@pytest.fixture
def hashed(tmp_path: Path) -> Iterator[ChromaBackend]:
    backend = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder())
    backend.open()
    yield backend
    backend.close()


def test_a_fact_is_filtered_by_its_type_and_its_category_as_libsql_holds_them(hashed: ChromaBackend) -> None:
    """A fact with a category and no type was indexed with its category as its type."""
    log = Log()
    apply_batch(hashed, [log.env("memory.fact.changed", fact("f1", "plays the cello", fact_type="", category="hobby")),
                         log.env("memory.fact.changed", fact("f2", "lives in Lyon", fact_type="location"))])
    assert [h.id for h in search(hashed, log, "cello", where={"category": "hobby"})] == ["f1"]
    assert search(hashed, log, "cello", where={"fact_type": "hobby"}) == []
    (hit,) = search(hashed, log, "Lyon", where={"fact_type": "location"})
    assert (hit.id, hit.metadata["category"]) == ("f2", "general") and "fact_type" not in \
        search(hashed, log, "cello", where={"category": "hobby"})[0].metadata


def test_same_batch_twice_is_skipped_and_counts_stay(hashed: ChromaBackend) -> None:
    log = Log()
    batch = [log.env("memory.fact.changed", fact(f"f{i}", f"fact number {i}")) for i in range(5)]
    batch.append(log.env("conversation.message.changed", {
        "op": "created", "message_id": "m1", "conversation_id": "c1", "user_id": "u1", "role": "user",
        "text": "hello there", "timestamp": "2023-11-14T22:13:20Z", "created_at": 1.7e9}))
    apply_batch(hashed, batch)
    outcomes, position = apply_batch(hashed, batch)
    assert {o.status for o in outcomes} == {"skipped"} and position == 6
    apply_batch(hashed, batch, position=0)  # a replay past a lost position: idempotent upserts
    assert hashed.stats() == {"memory": 5, "conversation": 1}
    assert hashed.bm25 is not None and hashed.bm25.count("memory") == 5


def test_searches_between_writes_see_every_record(hashed: ChromaBackend) -> None:
    """The worker keeps each collection's size between writes (Chroma counts 100k records in ~8 ms); a search
    asks for at most that many, so a size not updated after a write would hide records."""
    log = Log()
    apply_batch(hashed, [log.env("memory.fact.changed", fact(f"f{i}", f"tea fact {i}")) for i in range(3)])
    assert len(search(hashed, log, "tea fact", k=10)) == 3
    apply_batch(hashed, [log.env("memory.fact.changed", fact(f"f{i}", f"tea fact {i}")) for i in range(3, 6)])
    assert len(search(hashed, log, "tea fact", k=10)) == 6
    apply_batch(hashed, [log.env("semantic.remove.request", {"id": "f0", "collection": "memory"}, reply_to="i")])
    assert hashed.stats()["memory"] == hashed.collection("memory").count() == 5
    assert sorted(h.id for h in search(hashed, log, "tea fact", k=10)) == [f"f{i}" for i in range(1, 6)]


@pytest.mark.parametrize("ids_max", [50_000, 0], ids=["by-ids", "by-where"])
def test_a_user_filter_finds_what_chromas_where_finds(hashed: ChromaBackend, monkeypatch: pytest.MonkeyPatch,
                                                      ids_max: int) -> None:
    """A search for one user names the user's documents by id (or asks for no filter when the store is theirs
    alone) instead of Chroma's slow metadata ``where``: the same hits either way."""
    monkeypatch.setattr("workers.chroma.IDS_FILTER_MAX", ids_max)
    log = Log()
    owners = ["u1"] * 8 + ["u2"] * 2
    apply_batch(hashed, [log.env("memory.fact.changed", fact(f"f{i}", f"note {i} about tea and cake", user=u))
                         for i, u in enumerate(owners)])
    coll = hashed.collection("memory")

    def chroma_where(user: str) -> list[str]:
        vector = hashed._embed_query("tea cake")
        found = coll.query(query_embeddings=[vector], n_results=10, where=hashed._where(user, {}),
                           include=["distances"])
        return list(found["ids"][0])

    for user in ("u1", "u2", "u3"):
        got = [h.id for h in search(hashed, log, "tea cake", user_id=user, k=10, min_relevance=-1.0)]
        assert sorted(got) == sorted(chroma_where(user)), user
        assert len(got) == owners.count(user)
    # what a search learnt of u2's and u3's documents does not outlive a write
    apply_batch(hashed, [log.env("memory.fact.changed", fact(f"f{i}", f"more tea and cake {i}", user=u))
                         for i, u in ((10, "u2"), (11, "u3"))])
    for user, expected in (("u2", ["f10", "f8", "f9"]), ("u3", ["f11"])):
        got = [h.id for h in search(hashed, log, "tea cake", user_id=user, k=10, min_relevance=-1.0)]
        assert sorted(got) == sorted(chroma_where(user)) == expected, user
    apply_batch(hashed, [log.env("semantic.remove.request", {"id": f"f{i}", "collection": "memory"},
                                 reply_to="i") for i in (10, 11)])
    apply_batch(hashed, [log.env("semantic.remove.request", {"id": f"f{i}", "collection": "memory"},
                                 reply_to="i") for i in (8, 9)])  # now every document is u1's
    assert hashed.bm25 is not None and hashed.bm25.count_of_user("memory", "u1") == hashed.size("memory") == 8
    got = [h.id for h in search(hashed, log, "tea cake", user_id="u1", k=10, min_relevance=-1.0)]
    assert sorted(got) == sorted(chroma_where("u1")) == [f"f{i}" for i in range(8)]
    assert search(hashed, log, "tea cake", user_id="u2", k=10, min_relevance=-1.0) == []


def test_position_and_index_survive_reopen(tmp_path: Path) -> None:
    log = Log()
    first = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder())
    first.open()
    apply_batch(first, [log.env("memory.fact.changed", fact("f1", "the user plays chess"))])
    apply_batch(first, [log.env("semantic.index.request", {"id": "note-1", "text": "a note about chess"},
                                reply_to="inbox-1")])
    first.close()
    again = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder())
    again.open()
    try:
        assert again.load_position() == 2
        assert [seq for seq, _ in again.outbox_pending()] == [2]
        hits = search(again, log, "chess", hybrid=True)
        assert {h.id for h in hits} == {"f1", "note-1"}
    finally:
        again.close()


def test_a_store_embedded_by_another_model_is_refused_at_open_naming_both(tmp_path: Path) -> None:
    """Chroma opened it, and every search then failed on the vectors' size (found by rebuilding the store with
    one model while `membus up` ran another)."""
    log = Log()
    first = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder(64))
    first.open()
    first.close()
    empty = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder(32))
    empty.open()  # nothing in it yet: it becomes this model's
    apply_batch(empty, [log.env("memory.fact.changed", fact("f1", "the user plays chess"))])
    empty.close()
    other = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder(64))
    with pytest.raises(StoreError) as refused:
        other.open()
    other.close()
    assert "'hash-32' (32 dimensions)" in refused.value.message and "'hash-64' (64)" in refused.value.message
    same = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder(32))
    same.open()
    try:
        assert [h.id for h in search(same, log, "chess", hybrid=False)] == ["f1"]
    finally:
        same.close()


@pytest.mark.parametrize("model", ["all-MiniLM-L12-v9", "/no/such/model/folder"])
def test_an_embedding_model_that_cannot_be_loaded_is_refused_naming_it_and_the_setting(
        tmp_path: Path, model: str) -> None:
    """A mistyped model name failed with "We couldn't connect to 'https://huggingface.co' ... Check your internet
    connection", naming neither the model nor the setting."""
    backend = ChromaBackend(tmp_path / "chroma", embedding_model=model, embedding_device="cpu")
    with pytest.raises(StoreError) as refused:
        backend.open()
    backend.close()
    assert repr(model) in refused.value.message and "MEMBUS_EMBEDDING_MODEL" in refused.value.message


def test_a_search_that_fails_after_indexing_the_batch_so_far_leaves_that_indexing_in_place(
        hashed: ChromaBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search first writes what earlier messages of its batch queued (BM25 is written in the sidecar's
    transaction); when the search then fails, its savepoint's rollback takes that BM25 indexing with it, and
    the commit must write it again."""
    log = Log()

    def fail(*_: Any, **__: Any) -> Any:
        raise RuntimeError("the search failed")

    monkeypatch.setattr(hashed, "semantic_search", fail)
    batch = [log.env("memory.fact.changed", fact("f1", "my parrot speaks three languages")),
             log.env("memory.search.semantic.request", {"query": "parrot"}, reply_to="inbox-1")]
    outcomes, _ = apply_batch(hashed, batch)
    assert [o.status for o in outcomes] == ["applied", "retry"]
    assert hashed.bm25 is not None and [d for d, _ in hashed.bm25.search("memory", "parrot")] == ["f1"]
    assert hashed.size("memory") == 1


def test_a_record_chroma_refuses_fails_its_transaction_as_rejected_and_writes_nothing(
        hashed: ChromaBackend) -> None:
    """The contracts keep such keys out (a ``#`` starts Chroma's own keys); a record that gets past them anyway
    is refused at commit as a StoreRejected, which the runtime isolates, not as a StoreError it would retry for
    ever."""
    with pytest.raises(StoreRejected, match="for a memory record"), hashed.transaction() as txn:
        hashed.index(txn, "memory", "good", "a fine text", {"user_id": "u1"})
        hashed.index(txn, "memory", "bad", "another text", {"user_id": "u1", "#document": "x"})
    assert hashed.size("memory") == 0 and hashed.bm25 is not None and hashed.bm25.count("memory") == 0


def test_superseded_fact_is_no_longer_returned(hashed: ChromaBackend) -> None:
    log = Log()
    apply_batch(hashed, [log.env("memory.fact.changed", fact("f1", "user lives in Paris"))])
    assert [h.id for h in search(hashed, log, "lives in Paris", user_id="u1")] == ["f1"]
    old = fact("f1", "user lives in Paris", superseded_by="f2")
    apply_batch(hashed, [log.env("memory.fact.changed", old),
                         log.env("memory.fact.changed", fact("f2", "user lives in Lyon"))])
    for hybrid in (False, True):
        ids = [h.id for h in search(hashed, log, "lives in Paris", hybrid=hybrid, user_id="u1", k=5)]
        assert ids == ["f2"], ids
    assert hashed.stats()["memory"] == 1


def test_a_failing_message_leaves_no_trace(hashed: ChromaBackend) -> None:
    log = Log()
    good = log.env("memory.fact.changed", fact("f1", "likes green tea"))
    bad = log.env("memory.fact.changed", {"user_id": "u1", "text": "no fact id"}, raw=True)
    outcomes, position = apply_batch(hashed, [good, bad])
    assert [o.status for o in outcomes] == ["applied", "failed"] and position == 2
    assert outcomes[1].error is not None and outcomes[1].error.code == "validation"
    assert hashed.stats()["memory"] == 1
    assert hashed.bm25 is not None and hashed.bm25.count("memory") == 1


def test_search_sees_writes_earlier_in_its_batch(hashed: ChromaBackend) -> None:
    log = Log()
    write = log.env("semantic.index.request", {"id": "n1", "text": "piano lessons",
                                               "collection": "conversation", "user_id": "u1"},
                    reply_to="inbox-1")
    ask = log.env("memory.search.semantic.request", {"query": "piano lessons", "collection": "all"},
                  reply_to="inbox-1")
    outcomes, _ = apply_batch(hashed, [write, ask])
    assert [h.id for h in outcomes[1].reply.hits] == ["n1"]
    assert outcomes[1].reply.hits[0].collection == "conversation"


def test_an_indexed_text_owned_through_its_metadata_is_found_by_its_user(hashed: ChromaBackend) -> None:
    """``metadata: {"user_id": ...}`` without a top-level ``user_id`` lost its owner: a search of that user
    found nothing."""
    log = Log()
    apply_batch(hashed, [log.env("semantic.index.request",
                                 {"id": "n1", "text": "piano lessons", "metadata": {"user_id": "u9"}}),
                         log.env("semantic.index.request",
                                 {"id": "n2", "text": "piano lessons", "user_id": "u8",
                                  "metadata": {"user_id": "u9"}})])
    assert [h.id for h in search(hashed, log, "piano lessons", user_id="u9")] == ["n1"]
    assert [h.id for h in search(hashed, log, "piano lessons", user_id="u8")] == ["n2"]
