"""Stable 64-bit hashes of strings and integers, vectorised with numpy.

Polars' own `hash` may change between versions, so anything that must come out the same on
another machine, another day or another engine (train/eval splits by user, which conversations a
cap keeps, partition buckets) hashes with these: plain integer arithmetic modulo 2**64 on the
UTF-8 bytes, then a splitmix64 finaliser.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl
import pyarrow as pa

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BASE = np.uint64(0x100000001B3)  # odd: a bijection of the running value modulo 2**64
_CHUNK = 16 << 20


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit over the output."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def salt_of(salt: str | int) -> np.uint64:
    """A uint64 seed from a text or integer salt."""
    if isinstance(salt, str):
        return hash_strings([salt])[0]
    return mix64(np.array([salt & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]


def hash_strings(values: pl.Series | pa.Array | pa.ChunkedArray | Iterable[str], salt: str | int = 0) -> np.ndarray:
    """uint64 hash of each string (nulls hash like the empty string with a different length tag)."""
    if isinstance(values, pl.Series):
        arr = values.cast(pl.String).to_arrow()
    elif isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values
    else:
        arr = pa.array(list(values), pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.large_string())
    arr = arr.cast(pa.large_string())
    seed = salt_of(salt) if salt else np.uint64(0)
    out = np.empty(len(arr), dtype=np.uint64)
    if len(arr) == 0:
        return out
    # Chunks of about _CHUNK bytes (the per-byte work arrays are 8 bytes a byte).
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=arr.offset + len(arr) + 1)[arr.offset:]
    start = 0
    while start < len(arr):
        stop = int(np.searchsorted(offsets, offsets[start] + _CHUNK, side="right")) - 1
        stop = min(max(stop, start + 1), len(arr))
        out[start:stop] = _hash_chunk(arr.slice(start, stop - start), seed)
        start = stop
    return out


def _hash_chunk(arr: pa.LargeStringArray, seed: np.uint64) -> np.ndarray:
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=arr.offset + n + 1)[arr.offset:]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, ends = offsets[:-1], offsets[1:]
    lengths = ends - starts
    base = int(starts[0])
    total = int(ends[-1] - base)
    h = np.zeros(n, dtype=np.uint64)
    if total:
        bytes_ = data[base:base + total].astype(np.uint64) + np.uint64(1)
        owner_end = np.repeat(ends - base, lengths)
        rev = owner_end - 1 - np.arange(total)  # distance of each byte from its string's end
        powers = _powers(int(lengths.max()))
        with np.errstate(over="ignore"):
            terms = bytes_ * powers[rev]
            csum = np.concatenate([np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)])
            h = csum[ends - base] - csum[starts - base]
    with np.errstate(over="ignore"):
        h = mix64(h ^ ((lengths.astype(np.uint64) + np.uint64(1)) * _GOLDEN) ^ seed)
    if arr.null_count:
        h = np.where(arr.is_null().to_numpy(zero_copy_only=False), mix64(h + _GOLDEN), h)
    return h


_POWERS = np.ones(1, dtype=np.uint64)


def _powers(n: int) -> np.ndarray:
    global _POWERS
    if len(_POWERS) < n:
        size = max(n, 2 * len(_POWERS))
        p = np.empty(size, dtype=np.uint64)
        p[0] = 1
        with np.errstate(over="ignore"):
            for i in range(1, size):  # once per process, up to the longest string seen
                p[i] = p[i - 1] * _BASE
        _POWERS = p
    return _POWERS


def unit_interval(hashes: np.ndarray) -> np.ndarray:
    """Hashes as floats uniform on [0, 1) (top 53 bits)."""
    return (np.asarray(hashes, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def hash_column(df: pl.DataFrame, column: str, salt: str | int = 0, unique: bool = True) -> pl.Series:
    """`hash_strings` of one column, computed once per distinct value when `unique` (ids repeat a lot)."""
    if not unique or df.height == 0:
        return pl.Series(column + "_hash", hash_strings(df[column], salt), dtype=pl.UInt64)
    distinct = df.select(pl.col(column).unique())
    keyed = distinct.with_columns(pl.Series("_h", hash_strings(distinct[column], salt), dtype=pl.UInt64))
    return df.select(column).join(keyed, on=column, how="left", maintain_order="left")["_h"].alias(column + "_hash")
