"""Near-duplicate detection for texts: normalisation, word shingles, MinHash, banded LSH.

A document (here: the user messages of one conversation) is normalised (lowercase, anything but
letters and digits becomes a space), cut into shingles (its words and pairs of neighbouring
words), and summarised by `num_perm` MinHash values: the chance that two documents agree on one
value is the Jaccard similarity of their shingle sets. Documents agreeing on all `rows` values of
any of the `num_perm / rows` bands become candidates; a candidate is kept only if the estimated
similarity to its band's first document reaches `threshold`; connected components of what is
kept are the near-duplicate groups. Everything is vectorised (no pairwise loops), so a cluster of
thousands of copies costs as much as thousands of singletons.

Shingles are hashed by Polars with fixed seeds, and permuted with fixed constants: the same
documents give the same groups on any machine with the same Polars version.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl

from alignloop.data.stablehash import mix64

NON_WORD = r"[^\p{L}\p{N}]+"
_MUL = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 1 << 15  # shingles per block in `minhash`: a few hundred KiB of buffers, in L2


def normalize(expr: pl.Expr) -> pl.Expr:
    """Lowercase; every run of non-letters/digits (punctuation, emojis, whitespace) -> one space."""
    return expr.str.to_lowercase().str.replace_all(NON_WORD, " ").str.strip_chars()


def shingles(docs: pl.DataFrame, doc: str = "doc", text: str = "text", normalized: bool = False
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc index, word hash, word-pair hash) per word of each document's normalised text, in order.

    A word's pair is hashed with the next word of the same document (the last word of a document
    pairs with itself, which changes no minimum). Shingle hashes are Polars hashes with fixed
    seeds: the same on every machine running the same Polars version.
    """
    norm = pl.col(text) if normalized else normalize(pl.col(text))
    words = (docs.select(pl.col(doc).cast(pl.Int64).alias("doc"), norm.str.split(" ").alias("w"))
             .explode("w")
             .filter(pl.col("w").is_not_null() & (pl.col("w") != ""))
             .select("doc", h=pl.col("w").hash(seed=17)))
    if words.height == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    d = words["doc"].to_numpy()
    h = words["h"].to_numpy()
    nxt = np.r_[h[1:], h[-1:]]
    last = np.r_[d[1:] != d[:-1], True]
    with np.errstate(over="ignore"):
        pair = np.where(last, h, mix64(h * _MUL + nxt + np.uint64(1)))
    return d, h, pair


def minhash(doc_idx: np.ndarray, words: np.ndarray, pairs: np.ndarray | None, n_docs: int, num_perm: int = 64,
            seed: int = 0) -> np.ndarray:
    """(n_docs, num_perm) uint64 MinHash signatures of the shingle sets {words} | {pairs}; a document
    without shingles gets all-max values. `doc_idx` must be sorted; repeated shingles are harmless.

    Permutation k maps a shingle x to a_k * mix(x) + b_k (mod 2**64), a_k odd.
    """
    sig = np.full((n_docs, num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    if len(doc_idx) == 0:
        return sig
    rng = np.random.default_rng([seed, 0x5EED])
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    starts = np.flatnonzero(np.r_[True, doc_idx[1:] != doc_idx[:-1]])
    docs = doc_idx[starts]
    xs = [mix64(words)] + ([mix64(pairs)] if pairs is not None else [])
    # Blocks of whole documents, about _BLOCK shingles each, every permutation run on a block while
    # it sits in cache: one flat pass per permutation over all shingles is bound by memory.
    cut = np.searchsorted(starts, np.arange(0, len(doc_idx), _BLOCK), side="left")
    bounds = np.unique(np.r_[cut, len(starts)])

    def block(i: int) -> None:
        d0, d1 = int(bounds[i]), int(bounds[i + 1])
        lo = int(starts[d0])
        hi = int(starts[d1]) if d1 < len(starts) else len(doc_idx)
        local = starts[d0:d1] - lo
        part = [x[lo:hi] for x in xs]
        m, y = np.empty(hi - lo, np.uint64), np.empty(hi - lo, np.uint64)
        with np.errstate(over="ignore"):
            for k in range(num_perm):
                np.add(np.multiply(part[0], a[k], out=m), b[k], out=m)
                for x in part[1:]:
                    np.minimum(m, np.add(np.multiply(x, a[k], out=y), b[k], out=y), out=m)
                sig[docs[d0:d1], k] = np.minimum.reduceat(m, local)

    # numpy lets go of the GIL in these loops: blocks run on as many threads as Polars has.
    workers = min(pl.thread_pool_size(), len(bounds) - 1)
    if workers <= 1:
        for i in range(len(bounds) - 1):
            block(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(block, range(len(bounds) - 1)))
    return sig


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of the graph with edges (u[i], v[i]): each node's smallest member."""
    label = np.arange(n, dtype=np.int64)
    if len(u) == 0:
        return label
    while True:
        m = np.minimum(label[u], label[v])
        before = label.copy()
        np.minimum.at(label, u, m)
        np.minimum.at(label, v, m)
        while True:  # pointer jumping: everyone points at their root
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            return label


def lsh_groups(sig: np.ndarray, rows: int = 4, threshold: float = 0.7, eligible: np.ndarray | None = None) -> np.ndarray:
    """Near-duplicate group of each document (the smallest document index in its group).

    Bands of `rows` MinHash values; documents sharing a band are compared with the band's first
    document, and joined when their estimated Jaccard similarity is at least `threshold`.
    Documents not `eligible` stay alone.
    """
    n, num_perm = sig.shape
    if num_perm % rows:
        raise ValueError(f"num_perm {num_perm} is not a multiple of rows {rows}")
    idx = np.arange(n) if eligible is None else np.flatnonzero(eligible)
    if len(idx) < 2:
        return np.arange(n, dtype=np.int64)
    s = sig if eligible is None else sig[idx]

    def band(b: int) -> tuple[np.ndarray, np.ndarray]:
        block = s[:, b * rows:(b + 1) * rows]
        key = np.zeros(len(idx), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(rows):
                key = mix64(key * _MUL + block[:, j])
        # Stable: equal keys stay in document order, so each band's first document is its smallest.
        order = np.argsort(key, kind="stable")
        k_sorted = key[order]
        first = np.r_[True, k_sorted[1:] != k_sorted[:-1]]
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
        rep = order[group_start]
        cand = ~first
        u, v = order[cand], rep[cand]
        similar = (s[u] == s[v]).mean(axis=1) >= threshold
        return idx[u[similar]], idx[v[similar]]

    # numpy lets go of the GIL in its sorts and arithmetic: the bands go two at a time where Polars
    # has two threads or more, as `minhash` runs on its pool (110k documents, 16 bands: 0.22 s on
    # one thread, 0.11 on two).
    with ThreadPoolExecutor(max_workers=min(2, pl.thread_pool_size())) as pool:
        edges = list(pool.map(band, range(num_perm // rows)))
    u = np.concatenate([e[0] for e in edges])
    v = np.concatenate([e[1] for e in edges])
    return components(n, u, v) if len(u) else np.arange(n, dtype=np.int64)


def near_duplicate_groups(texts: Sequence[str], num_perm: int = 64, rows: int = 4, threshold: float = 0.7,
                          min_words: int = 0, seed: int = 0) -> np.ndarray:
    """Group of each text (the index of the first text of its group); texts with fewer than
    `min_words` normalised words are left alone."""
    docs = pl.DataFrame({"doc": np.arange(len(texts)), "text": list(texts)}, schema={"doc": pl.Int64, "text": pl.String})
    d, words, pairs = shingles(docs)
    sig = minhash(d, words, pairs, len(texts), num_perm, seed)
    n_words = docs.select(normalize(pl.col("text")).str.split(" ").list.eval(pl.element().filter(pl.element() != "")).list.len())
    eligible = n_words.to_series().to_numpy() >= max(min_words, 1)
    return lsh_groups(sig, rows, threshold, eligible)
