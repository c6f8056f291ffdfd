"""Benchmarks of the semantic-memory (ChromaDB) and analytics (DuckDB) workers beside their raw ceilings.

    .venv/bin/python scripts/bench_stores.py           # full run: docs/benchmarks-stores.json (read in
                                                       # docs/benchmarks-stores.md)
    .venv/bin/python scripts/bench_stores.py --quick   # small sizes, JSON in the temp folder

1. Indexing: ``memory.fact.changed`` events (as the libSQL worker publishes them) through the broker to
   the chroma worker, until its group lag is 0, against ``SentenceTransformer.encode`` on the same texts.
2. Search: semantic and hybrid requests through the bus, one at a time, at two collection sizes.
3. Analytics: ``conversation.message.changed`` events through the duckdb worker against a DuckDB
   appender writing the same rows.

Every figure comes from this run on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_raw  # noqa: E402
from bench import system  # noqa: E402

from bus.client import Bus  # noqa: E402
from bus.home import Home  # noqa: E402

SEED = 20250601
USERS = 20
ENCODE_BATCH = 64
WHEN = "2025-06-01T12:00:00Z"

# -- deterministic fact-like sentences ---------------------------------------------------------------

SUBJECTS = ["My neighbour Kim", "My sister Anna", "My brother Luca", "My partner Sam", "My mother",
            "My father", "My friend Priya", "My colleague Tom", "Our neighbour Mrs Okafor", "My grandmother",
            "My cousin Mateo", "My boss Helen", "My best friend Yuki", "My son Noah", "My daughter Lea",
            "My roommate Jonas", "My uncle Ravi", "My aunt Carmen", "My coach Dmitri",
            "My therapist Dr Weiss"]
VERBS = ["loves", "hates", "is learning", "used to practise", "wants to try", "is afraid of",
         "is allergic to", "collects", "teaches", "writes about", "dreams about", "is saving money for",
         "recently started", "gave up", "talks a lot about", "is really good at", "is bad at",
         "gets excited about", "complains about", "spends weekends on"]
THINGS = ["hiking", "the cello", "Japanese", "sourdough baking", "rock climbing", "chess", "peanuts",
          "shellfish", "spicy Thai curry", "vintage cameras", "board games", "marathon running",
          "watercolour painting", "jazz piano", "salsa dancing", "gardening", "birdwatching",
          "mountain biking", "knitting", "pottery", "sailing", "Italian cooking", "yoga", "quantum physics",
          "medieval history", "science fiction novels", "horror films", "podcasts about crime",
          "open water swimming", "calligraphy", "woodworking", "bees", "thunderstorms", "flying",
          "public speaking", "spiders", "cats", "golden retrievers", "coffee", "green tea", "red wine",
          "dark chocolate", "strawberries", "mushrooms", "Rust programming", "machine learning",
          "electric cars", "vinyl records", "stand-up comedy", "opera", "football", "basketball", "tennis",
          "skiing", "surfing", "camping", "photography", "astronomy", "origami", "crossword puzzles"]
PLACES = ["Berlin", "Kyoto", "Lisbon", "Nairobi", "Toronto", "Melbourne", "Oslo", "Buenos Aires", "Seoul",
          "Marrakesh", "the Alps", "the lake district", "the old town", "the community centre", "the library",
          "a small village near Lyon", "the coast of Portugal", "the university campus", "the city park",
          "a cabin in the woods", "the local gym", "the farmers market", "the night school", "a tiny studio"]
TIMES = ["every Thursday evening", "on weekends", "since last spring", "for ten years", "twice a month",
         "every morning before work", "during the summer holidays", "after the divorce", "since childhood",
         "when the weather is good", "on rainy afternoons", "every autumn", "before big exams",
         "at least once a year", "most evenings", "since moving house"]
REASONS = ["because it helps with stress", "because a doctor recommended it", "to stay fit",
           "to meet new people", "since it reminds them of home", "for a trip next year",
           "because of a bad experience", "to impress a friend", "for their job", "because it is relaxing",
           "after reading a great book about it", "with a group of old friends", "despite a knee injury",
           "although it is expensive", "because it feels creative", "to learn something new"]
EXTRAS = ["and wants to get better", "and never misses a session", "but finds it hard sometimes",
          "and keeps a notebook about it", "and talks about it at dinner", "and plans to teach it one day",
          "and bought new gear for it", "but only with close friends", "and shares photos online",
          "and it makes them happy", "and would like company", "but has little free time"]
QUESTION_STARTS = ["What does", "Who", "Where does", "When does", "Why does", "Tell me about",
                   "Remind me what", "Does anyone like", "Which hobby does", "What is"]


def sentences(count: int, seed: int = SEED) -> list[str]:
    """``count`` varied fact-like sentences of 10 to 25 words, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        target = rng.randint(10, 25)
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(THINGS)}".split()
        tails = [f"in {rng.choice(PLACES)}", rng.choice(TIMES), rng.choice(REASONS), rng.choice(EXTRAS),
                 f"and also {rng.choice(VERBS)} {rng.choice(THINGS)}", f"near {rng.choice(PLACES)}"]
        rng.shuffle(tails)
        for tail in tails:
            if len(words) >= target:
                break
            words += tail.split()
        out.append(" ".join(words[:25]) + ".")
    return out


def queries(count: int, seed: int = SEED + 1) -> list[str]:
    """Short varied questions over the same vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        pick = rng.random()
        if pick < 0.4:
            out.append(f"{rng.choice(QUESTION_STARTS)} {rng.choice(SUBJECTS).lower()} think about "
                       f"{rng.choice(THINGS)}?")
        elif pick < 0.7:
            out.append(f"Who {rng.choice(VERBS)} {rng.choice(THINGS)} in {rng.choice(PLACES)}?")
        else:
            out.append(f"{rng.choice(THINGS)} {rng.choice(TIMES)}")
    return out


def fact_event(i: int, text: str) -> dict[str, Any]:
    """A ``memory.fact.changed`` payload as the libSQL worker's contract makes it."""
    return {"fact_id": f"f{i:07d}", "user_id": f"u{i % USERS}", "text": text, "fact_type": "personal",
            "category": "general", "confidence": 0.9, "metadata": {"source": "chat"}, "created_at": WHEN,
            "last_updated": WHEN, "last_accessed": WHEN, "access_count": 0, "version": 1,
            "superseded_by": None, "supersedes": None, "op": "created", "updated_at": WHEN}


def message_event(i: int, text: str) -> dict[str, Any]:
    """A ``conversation.message.changed`` payload as the libSQL worker's contract makes it."""
    created = 1_748_779_200.0 + i * 7.0
    return {"op": "created", "message_id": f"m{i:07d}", "conversation_id": f"c{i % 500}",
            "user_id": f"u{i % USERS}", "role": "user" if i % 2 else "assistant", "text": text,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)), "created_at": created,
            "sentiment": round((i % 21) / 10 - 1.0, 1), "metadata": {}}


# -- processes -----------------------------------------------------------------------------------------


class CpuShare:
    """CPU time during a block: used by this benchmark and its processes (broker, worker), and by everything else
    on the machine, in cores (Linux /proc only; None elsewhere). On a shared machine the second is the noise."""

    def __init__(self) -> None:
        self.ours_s: float | None = None
        self.others_cores: float | None = None

    @staticmethod
    def _ticks(path: str) -> list[str] | None:
        try:
            with open(path) as f:
                return f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None

    def _sample(self) -> tuple[float, float] | None:
        """(machine busy seconds, seconds used by this process and its descendants)."""
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:8]]
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        stats = {int(p): st for p in os.listdir("/proc") if p.isdigit() and (st := self._ticks(f"/proc/{p}/stat"))}
        family, grew = {os.getpid()}, True
        while grew:
            kids = {pid for pid, st in stats.items() if int(st[1]) in family} - family
            family |= kids
            grew = bool(kids)
        ours = sum(int(stats[pid][11]) + int(stats[pid][12]) for pid in family if pid in stats)
        return (sum(fields) - fields[3] - fields[4]) / hz, ours / hz

    def __enter__(self) -> CpuShare:
        self._start, self._t0 = self._sample(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end, wall = self._sample(), time.perf_counter() - self._t0
        if self._start is not None and end is not None and wall > 0:
            self.ours_s = end[1] - self._start[1]
            self.others_cores = round(max(0.0, (end[0] - self._start[0]) - self.ours_s) / wall, 2)


def _step(name: str) -> None:
    load = os.getloadavg()[0]
    print(f"[bench-stores {time.strftime('%H:%M:%S')} load {load:.2f}] {name}", file=sys.stderr, flush=True)


@contextmanager
def worker(home: Path, name: str) -> Iterator[None]:
    """One store worker of the broker at ``home``, joined to its group before this yields; always stopped."""
    env = {**os.environ, "MEMBUS_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bus", "worker", name, "--home", str(home)], env=env,
                            cwd=ROOT)
    try:
        with Bus.connect(home, module="bench-wait") as bus:
            deadline = time.monotonic() + 120
            while not bus.status()["groups"].get(name, {}).get("members"):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the {name} worker did not join")
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_drained(bus: Bus, group: str, timeout: float = 1800.0, poll: float = 0.05) -> None:
    """Returns once ``group`` has acknowledged everything in the log (its lag is 0)."""
    deadline = time.monotonic() + timeout
    while True:
        g = bus.status(timeout=30)["groups"].get(group, {})
        if g.get("lag", 1) == 0 and not g.get("inflight"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"group {group} still lags: {g}")
        time.sleep(poll)


def publish_all(bus: Bus, topic: str, payloads: list[dict[str, Any]], window: int = 4000) -> None:
    pending: list[Any] = []
    for payload in payloads:
        pending.append(bus.publish_nowait(topic, payload, timeout=300))
        if len(pending) >= window:
            for p in pending[: window // 2]:
                p.result(300)
            del pending[: window // 2]
    for p in pending:
        p.result(300)


def through_worker(group: str, topic: str, payloads: list[dict[str, Any]],
                   warmup: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds from the first publish of ``payloads`` until ``group`` has applied them all (lag 0)."""
    with system((group,)) as home, Bus.connect(home, module="bench-stores") as bus:
        publish_all(bus, topic, warmup)
        wait_drained(bus, group)
        load = os.getloadavg()[0]
        with CpuShare() as cpu:
            t0 = time.perf_counter()
            publish_all(bus, topic, payloads)
            published = time.perf_counter() - t0
            wait_drained(bus, group)
            seconds = time.perf_counter() - t0
        status = bus.status()["groups"][group]
    return {"items": len(payloads), "seconds": seconds, "items_per_s": len(payloads) / seconds,
            "publish_seconds": published, "delivered": status["delivered"], "load_at_start": load,
            "cpu_ms_per_item": None if cpu.ours_s is None else 1000 * cpu.ours_s / len(payloads),
            "others_cores": cpu.others_cores}


# -- 1. indexing throughput ----------------------------------------------------------------------------


def raw_model() -> Any:
    """The worker's default model, loaded the same way, for in-process ``encode`` calls."""
    from sentence_transformers import SentenceTransformer

    from workers.embedding import bundled_model_path, pick_device

    return SentenceTransformer(str(bundled_model_path()), device=pick_device())


def raw_encode(model: Any, texts: list[str], cpu: CpuShare | None = None) -> tuple[float, NDArray[np.float32]]:
    model.encode(texts[:ENCODE_BATCH], batch_size=ENCODE_BATCH, normalize_embeddings=True)  # warm-up
    with cpu or CpuShare():
        t = time.perf_counter()
        vectors = model.encode(texts, batch_size=ENCODE_BATCH, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False)
        seconds = time.perf_counter() - t
    return seconds, np.asarray(vectors, dtype=np.float32)


def indexing(model: Any, count: int, rounds: int) -> tuple[dict[str, Any], NDArray[np.float32]]:
    """Raw encode and the bus path, alternated ``rounds`` times on the same texts; medians."""
    texts = sentences(count)
    events = [fact_event(i, t) for i, t in enumerate(texts)]
    warm = [fact_event(10_000_000 + i, t) for i, t in enumerate(sentences(ENCODE_BATCH, seed=SEED - 1))]
    raw_runs, bus_runs = [], []
    vectors = np.zeros((0, 0), dtype=np.float32)
    for r in range(rounds):
        _step(f"indexing: raw encode of {count} texts (round {r + 1})")
        load = os.getloadavg()[0]
        cpu = CpuShare()
        seconds, vectors = raw_encode(model, texts, cpu)
        raw_runs.append({"seconds": seconds, "items_per_s": count / seconds, "load_at_start": load,
                         "cpu_ms_per_item": None if cpu.ours_s is None else 1000 * cpu.ours_s / count,
                         "others_cores": cpu.others_cores})
        _step(f"indexing: {count} memory.fact.changed through the chroma worker (round {r + 1})")
        bus_runs.append(through_worker("chroma", "memory.fact.changed", events, warm))
    raw_rate = statistics.median(r["items_per_s"] for r in raw_runs)
    bus_rate = statistics.median(r["items_per_s"] for r in bus_runs)
    words = [len(t.split()) for t in texts]
    return {"texts": count, "words_per_text": {"min": min(words), "mean": statistics.mean(words),
                                               "max": max(words)},
            "encode_batch_size": ENCODE_BATCH, "raw_encode": raw_runs, "through_bus": bus_runs,
            "raw_items_per_s": raw_rate, "bus_items_per_s": bus_rate, "ratio": bus_rate / raw_rate}, vectors


# -- 2. search latency ----------------------------------------------------------------------------------


class Precomputed:
    """An embedder that answers from vectors computed beforehand (the bulk fill only)."""

    def __init__(self, name: str, texts: list[str], vectors: NDArray[np.float32]) -> None:
        self.name = name
        self.dimensions = int(vectors.shape[1])
        self._rows = {t: i for i, t in enumerate(texts)}
        self._vectors = vectors

    def embed(self, texts: list[str]) -> NDArray[np.float32]:
        return self._vectors[[self._rows[t] for t in texts]]


class ModelEmbedder:
    """The in-process model behind the worker's Embedder interface (for the cost breakdown)."""

    def __init__(self, name: str, model: Any) -> None:
        self.name = name
        self.model = model
        self.dimensions = int(model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> NDArray[np.float32]:
        return np.asarray(self.model.encode(texts, batch_size=ENCODE_BATCH, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)


def fill_vectors(pool: NDArray[np.float32], count: int, seed: int = SEED) -> NDArray[np.float32]:
    """The pool's real embeddings, then vectors near them: two pool rows mixed, plus noise, unit length."""
    if count <= len(pool):
        return pool[:count]
    rng = np.random.default_rng(seed)
    extra = count - len(pool)
    a = rng.integers(0, len(pool), extra)
    b = rng.integers(0, len(pool), extra)
    mixed = pool[a] + 0.5 * pool[b] + rng.normal(0.0, 0.03, (extra, pool.shape[1])).astype(np.float32)
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    return np.concatenate([pool, mixed.astype(np.float32)])


def chroma_backend(home: Path, embedder: Any) -> Any:
    """The chroma worker's backend on ``home``'s store, with the same keys the worker uses."""
    from bus.sealing import store_keyring
    from workers.chroma import ChromaBackend

    where = Home(home)
    keyring = store_keyring(where.path, "chroma", where.settings().encryption)
    backend = ChromaBackend(where.data_dir("chroma"), embedder=embedder, encryption=keyring)
    backend.open()
    return backend


def bulk_fill(home: Path, texts: list[str], vectors: NDArray[np.float32], start: int, stop: int,
              model_name: str, chunk: int = 2000) -> float:
    """Indexes texts[start:stop] with the worker's own code (BM25, sealing, Chroma upsert) but precomputed
    vectors, in the bench process while no worker runs; the log position is left alone."""
    from workers.chroma import clean_metadata

    backend = chroma_backend(home, Precomputed(model_name, texts, vectors))
    t = time.perf_counter()
    try:
        for lo in range(start, stop, chunk):
            with backend.transaction() as txn:
                for i in range(lo, min(stop, lo + chunk)):
                    ev = fact_event(i, texts[i])
                    meta = clean_metadata({"meta_source": "chat", "kind": "fact", "user_id": ev["user_id"],
                                           "fact_type": "personal", "confidence": 0.9, "version": 1,
                                           "created_at": WHEN, "updated_at": WHEN})
                    backend.index(txn, "memory", ev["fact_id"], texts[i], meta)
        return time.perf_counter() - t
    finally:
        backend.close()


SEARCHES = {
    "semantic": ("memory.search.semantic.request", {}),
    "hybrid": ("memory.search.hybrid.request", {}),
    "semantic_user": ("memory.search.semantic.request", {"user_id": "u3"}),
    "hybrid_user": ("memory.search.hybrid.request", {"user_id": "u3"}),
}


def search_latency(home: Path, count: int) -> dict[str, Any]:
    """Sequential requests through the bus after a warm-up; the variants take turns on each query, so a
    slow spell of the machine hits them all alike."""
    asked = queries(count)
    lat: dict[str, list[float]] = {name: [] for name in SEARCHES}
    hits = dict.fromkeys(SEARCHES, 0)
    with worker(home, "chroma"), Bus.connect(home, module="bench-search") as bus:
        for q in queries(10, seed=SEED - 2):
            for topic, extra in SEARCHES.values():
                bus.request(topic, {"query": q, **extra}, timeout=120)
        for q in asked:
            for name, (topic, extra) in SEARCHES.items():
                t = time.perf_counter()
                reply = bus.request(topic, {"query": q, "k": 5, **extra}, timeout=120)
                lat[name].append(time.perf_counter() - t)
                hits[name] += len(reply.payload.hits)
    return {name: {"queries": count, "hits_per_query": hits[name] / count,
                   **bench_raw.latency_summary(lat[name])} for name in SEARCHES}


def breakdown(home: Path, embedder: ModelEmbedder, count: int) -> dict[str, Any]:
    """Where a hybrid query's time goes (in-process, same store and keys, medians in ms)."""
    import contracts.semantic as sem
    from workers.bm25 import terms

    backend = chroma_backend(home, embedder)
    try:
        steps = ("embed_query", "chroma_query", "bm25", "bm25_user", "hybrid_total")
        parts: dict[str, list[float]] = {k: [] for k in steps}
        postings: list[int] = []
        coll = backend.collection("memory")
        for q in queries(5, seed=SEED - 4):
            backend.hybrid_search(sem.HybridSearch(query=q))
        for q in queries(count, seed=SEED + 3):
            t = time.perf_counter()
            vector = backend._embed_query(q)
            parts["embed_query"].append(time.perf_counter() - t)
            t = time.perf_counter()
            coll.query(query_embeddings=[vector], n_results=50,
                       include=["documents", "metadatas", "distances"])
            parts["chroma_query"].append(time.perf_counter() - t)
            t = time.perf_counter()
            backend.bm25.search("memory", q, 50)
            parts["bm25"].append(time.perf_counter() - t)
            t = time.perf_counter()
            backend.bm25.search("memory", q, 50, "u3")
            parts["bm25_user"].append(time.perf_counter() - t)
            t = time.perf_counter()
            backend.hybrid_search(sem.HybridSearch(query=q))
            parts["hybrid_total"].append(time.perf_counter() - t)
            keys = list(dict.fromkeys(terms(q, backend.bm25.blinder)))
            postings.append(sum(int(r[0]) for k in keys for r in backend.conn.execute(
                "SELECT df FROM bm25_terms WHERE collection = 'memory' AND term = ?", (k,))))
        out: dict[str, Any] = {f"{k}_ms": round(statistics.median(v) * 1000, 3) for k, v in parts.items()}
        out["rest_ms"] = round(out["hybrid_total_ms"] - out["embed_query_ms"] - out["chroma_query_ms"]
                               - out["bm25_ms"], 3)
        """Fetching keyword-only hits from Chroma, opening sealed documents, fusion (by difference)."""
        out["bm25_postings_per_query"] = statistics.mean(postings)
        return out
    finally:
        backend.close()


def search(model: Any, pool: NDArray[np.float32], sizes: list[int], count: int) -> dict[str, Any]:
    from workers.embedding import DEFAULT_MODEL

    total = max(sizes)
    texts = sentences(total)
    vectors = fill_vectors(pool, total)
    embedder = ModelEmbedder(DEFAULT_MODEL, model)
    out: dict[str, Any] = {"real_vectors": min(len(pool), total), "queries": count, "by_size": {}}
    with system() as home:
        filled = 0
        for size in sorted(sizes):
            _step(f"search: bulk fill to {size} documents")
            fill_s = bulk_fill(home, texts, vectors, filled, size, DEFAULT_MODEL)
            rate = (size - filled) / fill_s
            filled = size
            _step(f"search: {count} queries x {len(SEARCHES)} variants at {size} documents")
            result = search_latency(home, count)
            result["fill_docs_per_s"] = rate
            result["breakdown"] = breakdown(home, embedder, min(count, 50))
            result["load_after"] = os.getloadavg()[0]
            out["by_size"][str(size)] = result
    small, large = str(min(sizes)), str(max(sizes))
    out["growth_p50"] = {k: out["by_size"][large][k]["p50_ms"] / out["by_size"][small][k]["p50_ms"]
                         for k in SEARCHES}
    return out


# -- 3. analytics ingestion ------------------------------------------------------------------------------


def duckdb_rows(payloads: list[dict[str, Any]]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The rows the duckdb worker writes for these change events: one message and one event each."""
    from contracts.ids import new_id

    messages, events = [], []
    for seq, p in enumerate(payloads, 1):
        messages.append((p["message_id"], p["conversation_id"], p["user_id"], p["role"], p["text"],
                         p["created_at"], p["sentiment"]))
        events.append((new_id(), seq, "conversation.message.changed", "changed", time.time_ns(), "libsql",
                       "", "", None))
    return messages, events


def duckdb_direct(payloads: list[dict[str, Any]], in_memory: bool, upsert: bool) -> dict[str, Any]:
    """The same rows into the worker's tables with one appender per table, one transaction."""
    import duckdb

    from workers.duckdb import TABLES

    messages, events = duckdb_rows(payloads)
    with tempfile.TemporaryDirectory(prefix="membus-bench-duck-") as tmp:
        con = duckdb.connect(":memory:" if in_memory else str(Path(tmp) / "raw.duckdb"))
        for ddl in TABLES.values():
            con.execute(ddl)
        t = time.perf_counter()
        con.execute("BEGIN")
        for table, rows in (("messages", messages), ("events", events)):
            appender = con.appender(table, action="upsert") if upsert else con.appender(table)
            appender.append_rows(rows)
            appender.flush()
        con.execute("COMMIT")
        seconds = time.perf_counter() - t
        con.close()
    return {"items": len(payloads), "rows": 2 * len(payloads), "seconds": seconds,
            "items_per_s": len(payloads) / seconds, "in_memory": in_memory, "upsert": upsert}


def analytics(count: int) -> dict[str, Any]:
    texts = sentences(count, seed=SEED + 5)
    payloads = [message_event(i, t) for i, t in enumerate(texts)]
    warm = [message_event(10_000_000 + i, t) for i, t in enumerate(sentences(500, seed=SEED - 3))]
    out: dict[str, Any] = {"events": count}
    for label, encrypted in (("encrypted", True), ("plaintext", False)):
        _step(f"analytics: {count} conversation.message.changed through the duckdb worker ({label} home)")
        os.environ["MEMBUS_ENCRYPTION"] = "1" if encrypted else "0"
        try:
            bus = through_worker("duckdb", "conversation.message.changed", payloads, warm)
        finally:
            del os.environ["MEMBUS_ENCRYPTION"]
        _step(f"analytics: direct appender ({label} home's store: {'in memory' if encrypted else 'file'})")
        direct = duckdb_direct(payloads, in_memory=encrypted, upsert=False)
        direct_upsert = duckdb_direct(payloads, in_memory=encrypted, upsert=True)
        out[label] = {"through_bus": bus, "direct_append": direct, "direct_upsert": direct_upsert,
                      "ratio": bus["items_per_s"] / direct["items_per_s"],
                      "ratio_vs_upsert": bus["items_per_s"] / direct_upsert["items_per_s"]}
    return out


# -- the run ------------------------------------------------------------------------------------------


PARTS = ("indexing", "search", "analytics")


def run(quick: bool, parts: tuple[str, ...] = PARTS, rounds: int | None = None,
        texts: int | None = None) -> dict[str, Any]:
    import torch

    from workers.embedding import DEFAULT_MODEL, pick_device

    out: dict[str, Any] = {
        "machine": {**bench_raw.machine(), "load_average_at_start": os.getloadavg(),
                    "torch_threads": torch.get_num_threads()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick,
        "versions": bench_raw.lib_versions("torch", "sentence-transformers", "transformers", "chromadb",
                                           "duckdb", "pyzmq", "msgspec"),
        "model": DEFAULT_MODEL, "device": pick_device(),
        "encryption_at_rest": True,
    }
    t0 = time.perf_counter()
    _step("loading the model")
    model = raw_model()
    index_count = texts or (300 if quick else 2000)
    if "indexing" in parts:
        out["indexing"], pool = indexing(model, index_count, rounds or (1 if quick else 3))
    else:
        pool = raw_encode(model, sentences(index_count))[1]
    if "search" in parts:
        sizes = [1000, 5000] if quick else [10_000, 100_000]
        out["search"] = search(model, pool, sizes, 20 if quick else 200)
    if "analytics" in parts:
        out["analytics"] = analytics(5000 if quick else 100_000)
    out["seconds"] = time.perf_counter() - t0
    out["machine"]["load_average_at_end"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one round (a smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: docs/ for a full run)")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    ap.add_argument("--rounds", type=int, help="indexing: rounds of raw and bus (default 3, 1 with --quick)")
    ap.add_argument("--texts", type=int, help="indexing: texts per round (default 2000, 300 with --quick)")
    args = ap.parse_args()
    result = run(args.quick, tuple(args.only or PARTS), args.rounds, args.texts)
    default = Path(tempfile.gettempdir()) / "membus-benchmarks-stores-quick.json" if args.quick \
        else ROOT / "docs" / "benchmarks-stores.json"
    out = args.out or default
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
