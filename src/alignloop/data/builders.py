"""Dataset builders: training sets from filtered user logs, in the chat layer's messages format.

Every example carries its conversation as OpenAI-style messages (`[{"role", "content"}, ...]`):
the character's system prompt first, then the conversation's selected path (the user turns and
the assistant candidates the user settled on; with `use_edits`, an answer the user rewrote reads
as rewritten) up to the example's point, at most `max_context_messages` of them, always starting
at a user message. Each has a `weight` (the per-user cap's down-weighting, 1 otherwise).

    sft.parquet        chosen swipes: the candidate a user settled on after swiping, ending the
                       messages (user-guided rejection sampling); `sft.source = "selected"` takes
                       every selected answer; "auto" (the default) takes swipes when the logs have
                       any, else selected (logs of people, or of a product without swipes). Never a
                       turn the quality filter flagged.
    dpo.parquet        prompt / chosen / rejected: chosen = the settled-on candidate, rejected = each
                       sibling that was shown and swiped away (same parent user turn).
    rm/<signal>/{train,eval}.parquet   one reward-model set per signal, split by user (a stable hash
                       of the user id: no user in both): preference (pairs, as DPO but flagged chosen
                       answers too), thumbs (+1/-1), continue, turns_after, time_to_next (seconds;
                       null and censored=true when the user never replied), returned_1d, returned_7d
                       (censored outcomes left out), safety (1 = the user reported the answer).
    distill.parquet    prompts (messages ending with a user turn) for a teacher to answer.
    rl/{train,eval}.jsonl   RL prompts: the same contexts ending with a user turn (their own
                       `rl.max_context_messages` if set), deduplicated over both splits, split by
                       user exactly as the reward-model sets are (same salt and eval share), so
                       the users an RL run is evaluated on are the reward models' held-out users
                       too; always JSONL (what the RL stage's `env.prompts` reads), Parquet too
                       when `formats` has it.

Each build also says, in one line each (`BuildReport.notes`, printed and in build_report.json),
which SFT source `auto` chose and why, and why a dataset came out empty or with a constant label
(no swipes, no reports, every outcome censored, ...): a dataset that cannot train anything is named
instead of handed silently to a trainer.

`iter_partition` turns one partition of users into these datasets (Arrow tables, one at a time),
so the same code runs per block on Ray Data; `DatasetWriter` appends them, partition after
partition, into the files; `build_datasets` does both in this process and returns a `BuildReport`.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from alignloop.data.filters import FILTERED_SCHEMAS, Frames, prepare, split_partitions
from alignloop.data.io import read_table, read_tables
from alignloop.data.parts import partitions_in, read_partition
from alignloop.data.schema import doc_field
from alignloop.data.stablehash import hash_column, hash_strings, unit_interval
from alignloop.recipes import Section
from alignloop.runs import atomic_path

Signal = Literal["preference", "thumbs", "continue", "turns_after", "time_to_next", "returned_1d", "returned_7d",
                 "safety"]
SIGNALS: tuple[str, ...] = ("preference", "thumbs", "continue", "turns_after", "time_to_next", "returned_1d",
                            "returned_7d", "safety")


# --- schemas -----------------------------------------------------------------------------------

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

_ID = doc_field("example_id", pa.string(), "unique example id")
_USER = doc_field("user_id", pa.string(), "the user whose behaviour produced it")
_CONV = doc_field("conversation_id", pa.string(), "its conversation")
_WEIGHT = doc_field("weight", pa.float64(), "training weight (per-user cap), 1 = full")

SFT = pa.schema([
    _ID, _USER, _CONV,
    doc_field("turn_id", pa.string(), "the target: the assistant turn ending `messages`"),
    doc_field("character_id", pa.string(), "the character"),
    doc_field("source", pa.string(), "swipe (settled on after swiping) or selected (accepted as shown)"),
    doc_field("messages", MESSAGES, "system, context, and the target assistant message last"),
    _WEIGHT,
])
PAIRS = pa.schema([
    _ID, _USER, _CONV,
    doc_field("parent_id", pa.string(), "the user turn both answer"),
    doc_field("chosen_turn_id", pa.string(), "the candidate the user settled on"),
    doc_field("rejected_turn_id", pa.string(), "a shown sibling the user swiped away"),
    doc_field("prompt", MESSAGES, "system and context, ending with the user turn"),
    doc_field("chosen", MESSAGES, "[the chosen assistant message]"),
    doc_field("rejected", MESSAGES, "[the rejected assistant message]"),
    _WEIGHT,
])
SCALAR = pa.schema([
    _ID, _USER, _CONV,
    doc_field("turn_id", pa.string(), "the assistant turn scored"),
    doc_field("messages", MESSAGES, "system, context, and the scored assistant message last"),
    doc_field("label", pa.float64(), "the signal's value; null when censored", nullable=True),
    doc_field("censored", pa.bool_(), "the outcome was not observed (time_to_next: the user never replied)"),
    _WEIGHT,
])
DISTILL = pa.schema([
    _ID, _USER, _CONV,
    doc_field("turn_id", pa.string(), "the user turn ending `messages`"),
    doc_field("character_id", pa.string(), "the character"),
    doc_field("messages", MESSAGES, "system and context, ending with the user turn"),
    _WEIGHT,
])
RL = pa.schema([
    _ID, _USER, _CONV,
    doc_field("turn_id", pa.string(), "the user turn ending `messages`"),
    doc_field("character_id", pa.string(), "the character"),
    doc_field("messages", MESSAGES, "system and context, ending with the user turn: what the policy answers"),
    _WEIGHT,
])
DATASET_SCHEMAS: dict[str, pa.Schema] = {"sft": SFT, "dpo": PAIRS, "distill": DISTILL, "rl": RL,
                                         **{f"rm/{s}": PAIRS if s == "preference" else SCALAR for s in SIGNALS}}


# --- configuration -----------------------------------------------------------------------------


class SFTBuild(Section):
    """`[build.sft]`: which answers become supervised examples."""

    enabled: bool = True
    source: Literal["auto", "swipes", "selected"] = Field(
        "auto", description="swipes: answers settled on after swiping; selected: every selected answer; "
                            "auto: swipes when the logs have any, else selected")


class DPOBuild(Section):
    """`[build.dpo]`: chosen/rejected pairs from swiped-away siblings."""

    enabled: bool = True
    max_pairs_per_prompt: int | None = Field(None, ge=1, description="rejected siblings per chosen, lowest index first")
    require_swipe_event: bool = Field(False, description="rejected only if a swipe event on it survived filtering")


class RMBuild(Section):
    """`[build.rm]`: reward-model sets, one per signal, split by user into train and eval."""

    enabled: bool = True
    signals: list[Signal] = Field(default_factory=lambda: list(SIGNALS))
    eval_fraction: float = Field(0.1, ge=0, le=1, description="share of users in eval")
    salt: str = Field("rm-split", description="changes which users land in eval")
    safety_negatives_per_positive: float | None = Field(
        None, gt=0, description="keep at most this many unreported answers per reported one")


class DistillBuild(Section):
    """`[build.distill]`: prompts for a teacher to answer."""

    enabled: bool = True
    dedup: bool = Field(True, description="one prompt per distinct messages")
    max_prompts: int | None = Field(None, ge=1)


class RLBuild(Section):
    """`[build.rl]`: prompts for RL, split by user with the reward models' split (`build.rm.salt`,
    `build.rm.eval_fraction`): one split for both, so no RL prompt comes from a held-out user."""

    enabled: bool = True
    dedup: bool = Field(True, description="one prompt per distinct messages, over both splits (a text is in one)")
    max_prompts: int | None = Field(None, ge=1, description="per split, a stable hash sample")
    max_context_messages: int | None = Field(None, ge=1, description="messages of a prompt, the user turn "
                                             "included, at most; none: the build's max_context_messages")


class BuildConfig(Section):
    """`[build]`: how the datasets are built from filtered logs, and which."""

    max_context_messages: int | None = Field(20, ge=1, description="messages before the example's point, at most")
    use_edits: bool = Field(True, description="context shows answers as the user rewrote them")
    include_system: bool = True
    formats: list[Literal["parquet", "jsonl"]] = Field(default_factory=lambda: ["parquet"])
    partitions: int = Field(1, ge=1, description="user partitions built one at a time (unpartitioned input)")
    events_per_partition: int = Field(400_000, ge=1, description="bigger partitions are cut further in memory")
    sft: SFTBuild = SFTBuild()
    dpo: DPOBuild = DPOBuild()
    rm: RMBuild = RMBuild()
    distill: DistillBuild = DistillBuild()
    rl: RLBuild = RLBuild()


# --- building ----------------------------------------------------------------------------------


class _Context:
    """The messages of a partition, pooled once; every example's messages are pool indices.

    Pool: the selected path of every conversation in order (edited text when `use_edits`), then one
    system message per conversation, then every assistant turn as originally written. An example is
    (system?) + path[start:end] + (target?): a list of pool indices computed with numpy. The rows
    carry those index lists (8 bytes a message) through every join, sort and filter, and the
    strings are gathered once, straight into the Arrow column that is written (`materialize`).
    Concatenating nested string lists in Polars, or carrying them through the row operations,
    would copy every message several times over.
    """

    def __init__(self, frames: Frames, config: BuildConfig):
        self.config = config
        turns = frames["turns"]
        events = frames["events"]
        path = (turns.filter(pl.col("selected"))
                .sort("conversation_id", "position", "candidate_index")
                .select("turn_id", "conversation_id", "role", "text"))
        if config.use_edits:
            edits = (events.filter(pl.col("type") == "edit").sort("timestamp")
                     .group_by("turn_id").agg(edit=pl.col("text").last()))
            path = path.join(edits, on="turn_id", how="left", maintain_order="left").with_columns(
                content=pl.coalesce("edit", "text")).drop("edit")
        else:
            path = path.with_columns(content=pl.col("text"))
        path = path.with_columns(idx=pl.int_range(pl.len(), dtype=pl.Int64).over("conversation_id"))
        # A path must alternate user, assistant, user, ... from its root; anything else is skipped.
        expected = pl.when(pl.col("idx") % 2 == 0).then(pl.lit("user")).otherwise(pl.lit("assistant"))
        bad = path.filter(pl.col("role") != expected).select("conversation_id").unique()
        self.malformed = bad.height
        path = path.join(bad, on="conversation_id", how="anti").with_columns(
            pool=pl.int_range(pl.len(), dtype=pl.Int64))
        self.index = path.select("turn_id", "conversation_id", "idx")
        n_path = path.height

        convs = (frames["conversations"]
                 .join(path.group_by("conversation_id").agg(base=pl.col("pool").min()), on="conversation_id",
                       how="inner")
                 .join(frames["weights"].select("conversation_id", "weight"), on="conversation_id", how="left")
                 .with_columns(pl.col("weight").fill_null(1.0))
                 .with_columns(sys=(pl.int_range(pl.len(), dtype=pl.Int64) + n_path)))
        has_sys = (pl.col("system_prompt") != "") & pl.lit(config.include_system)
        self.convs = convs.select("conversation_id", "user_id", "character_id", "weight", "base",
                                  sys=pl.when(has_sys).then(pl.col("sys")).otherwise(-1))
        if config.rm.enabled or config.rl.enabled:  # each user's split, hashed once per partition (not per dataset)
            self.convs = self.convs.with_columns(_eval=is_eval(self.convs["user_id"], config.rm))
        originals = turns.filter(pl.col("role") == "assistant").select("turn_id", "text")
        self.original = originals.select("turn_id", target=pl.int_range(pl.len(), dtype=pl.Int64)
                                         + n_path + convs.height)
        role = pa.concat_arrays([_large(path["role"]), _large(pl.repeat("system", convs.height, eager=True)),
                                 _large(pl.repeat("assistant", originals.height, eager=True))])
        content = pa.concat_arrays([_large(path["content"]), _large(convs["system_prompt"]),
                                    _large(originals["text"])])
        self.pool = pa.StructArray.from_arrays([role, content], names=["role", "content"])
        self._pool_hash: np.ndarray | None = None
        self._last: list[tuple[pl.Series, pa.ChunkedArray]] = []

    def attach(self, df: pl.DataFrame, end: str = "end", target: str | None = None, name: str = "messages",
               window: int | None = None) -> pl.DataFrame:
        """Rows with conversation_id and an exclusive path index `end` (and, with `target`, the
        turn id of an assistant message to end with), plus user_id, character_id, weight and the
        messages column `name` (pool indices until `materialize`). `window`: at most this many
        messages before the end instead of the build's `max_context_messages`."""
        rows = df.join(self.convs, on="conversation_id", how="inner", maintain_order="left")
        if target is not None:
            rows = rows.join(self.original, left_on=target, right_on="turn_id", how="inner", maintain_order="left")
        k = window if window is not None else self.config.max_context_messages
        stop = rows[end].to_numpy().astype(np.int64)
        start = np.zeros_like(stop) if k is None else np.maximum(stop - k, 0)
        start += start % 2  # begin at a user message
        sys = rows["sys"].to_numpy()
        has_sys = (sys >= 0).astype(np.int64)
        length = stop - start
        extra = np.zeros_like(stop) if target is None else np.ones_like(stop)
        sizes = has_sys + length + extra
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=np.int64)
        first = offsets[:-1]
        flat[first[has_sys == 1]] = sys[has_sys == 1]
        within = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(np.cumsum(length) - length, length)
        flat[np.repeat(first + has_sys, length) + within] = np.repeat(rows["base"].to_numpy() + start, length) + within
        if target is not None:
            flat[first + has_sys + length] = rows["target"].to_numpy()
        out = rows.drop("base", "sys", *(["target"] if target is not None else []))
        return out.with_columns(_index_lists(name, offsets, flat))

    def at_parent(self, df: pl.DataFrame) -> pl.DataFrame:
        """Rows answering a user turn `parent_id` on the path, with `end` = just after that turn."""
        parent = self.index.select(parent_id="turn_id", end=pl.col("idx") + 1)
        return df.join(parent, on="parent_id", how="inner", maintain_order="left")

    def one(self, df: pl.DataFrame, turn: str, name: str) -> pl.DataFrame:
        """A one-message column `name`: the assistant turn `turn` as originally written."""
        rows = df.join(self.original.rename({"target": "_t"}), left_on=turn, right_on="turn_id", how="inner",
                       maintain_order="left")
        flat = rows["_t"].to_numpy().astype(np.int64)
        return rows.drop("_t").with_columns(_index_lists(name, np.arange(len(flat) + 1, dtype=np.int64), flat))

    def key(self, df: pl.DataFrame, column: str = "messages") -> pl.Series:
        """A 64-bit hash of each row's messages by content (role and text), equal across partitions
        for equal messages: what deduplication compares, without gathering the strings."""
        if self._pool_hash is None:
            pool = pl.from_arrow(pa.Table.from_arrays([self.pool.field("role"), self.pool.field("content")],
                                                      names=["role", "content"]))
            self._pool_hash = pool.select(h=pl.struct("role", "content").hash(seed=13))["h"].to_numpy()
        offsets, flat = _lists(df[column])
        hashes = _index_lists("_h", offsets, self._pool_hash[flat]).to_frame()
        return hashes.select(pl.col("_h").hash(seed=13))["_h"]

    def materialize(self, df: pl.DataFrame, schema: pa.Schema) -> pa.Table:
        """The rows as an Arrow table of `schema`: message columns gathered from the pool, the
        others cast to their types."""
        df = df.select(schema.names)
        arrow = df.select([f.name for f in schema if f.type != MESSAGES]).to_arrow()
        columns = [self.messages(df[f.name]) if f.type == MESSAGES else arrow.column(f.name).cast(f.type)
                   for f in schema]
        return pa.Table.from_arrays(columns, schema=schema)

    def messages(self, indices: pl.Series, chunk_rows: int = 32768) -> pa.ChunkedArray:
        """A list-of-messages column from a column of pool-index lists, gathered in chunks of rows
        (so no chunk's strings outgrow 32-bit offsets). The scalar reward sets share most of their
        rows (continue, turns_after, time_to_next: the same ones), so the last column gathered is
        reused when the same indices come again."""
        for seen, column in self._last:
            if seen.equals(indices):
                return column
        offsets, flat = _lists(indices)

        def gather(lo: int) -> pa.ListArray:
            hi = min(lo + chunk_rows, len(indices))
            a, b = int(offsets[lo]), int(offsets[hi])
            values = self.pool.take(pa.array(flat[a:b])).cast(MESSAGE)
            return pa.ListArray.from_arrays(pa.array((offsets[lo:hi + 1] - a).astype(np.int32)), values)

        # Copying the strings is most of the work; pyarrow lets go of the GIL, so chunks go in parallel.
        starts = range(0, len(indices), chunk_rows)
        workers = min(pa.cpu_count(), len(starts))
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="alignloop-gather") as pool:
                chunks = list(pool.map(gather, starts))
        else:
            chunks = [gather(lo) for lo in starts]
        out = pa.chunked_array(chunks, type=MESSAGES)
        self._last = [*self._last[-1:], (indices, out)]  # a train and an eval column
        return out


def _index_lists(name: str, offsets: np.ndarray, flat: np.ndarray) -> pl.Series:
    """A Polars list column from numpy offsets and values (no per-row Python)."""
    return pl.Series(name, pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(flat)))


def _lists(series: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, values) of a list column, whatever its chunks and slicing."""
    arr = series.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return offsets, flat.astype(np.int64, copy=False)


def _large(series: pl.Series) -> pa.Array:
    arr = series.cast(pl.String).to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.large_string())


DISTILL_SPILL = pa.schema([*DISTILL, pa.field("_key", pa.uint64())])
"""A distillation piece as a partition yields it: with the key its prompt is deduplicated by."""
RL_SPILL = pa.schema([*RL, pa.field("_key", pa.uint64()), pa.field("_eval", pa.bool_())])
"""An RL piece as a partition yields it (`rl`, both splits): its dedup key and its user's split."""

FACT = "logs:"
"""Prefix of the counts `iter_partition` adds beside its skip counts: facts about the logs that
explain an empty dataset or a constant label (`explain`), summed over partitions like the rest."""


def count_selects(filtered: Mapping[str, pa.Table | pl.DataFrame] | str | Path) -> int:
    """Select events in filtered logs (tables, or a folder of them): the answers users settled on
    after swiping. Reads only the events' type column of a Parquet folder."""
    if isinstance(filtered, (str, Path)):
        folder = Path(filtered)
        parquet = folder / "events.parquet"
        if parquet.is_file():
            return pl.scan_parquet(parquet).filter(pl.col("type") == "select").select(pl.len()).collect().item()
        jsonl = folder / "events.jsonl"
        if not jsonl.is_file():
            return 0
        events: pa.Table | pl.DataFrame = read_table(jsonl, "events", FILTERED_SCHEMAS)
    else:
        events = filtered["events"]
    frame = events if isinstance(events, pl.DataFrame) else pl.from_arrow(events.select(["type"]))
    return frame.filter(pl.col("type") == "select").height


def choose_sft_source(config: BuildConfig, selects: int) -> tuple[BuildConfig, str]:
    """The config with `sft.source` decided (auto: swipes when the logs have select events, else
    selected) and one line saying which source SFT takes and why. Decided once over all the logs,
    before any partition is built, so every partition takes the same kind of target."""
    source = config.sft.source
    if source == "auto":
        source = "swipes" if selects else "selected"
        config = config.model_copy(update={"sft": config.sft.model_copy(update={"source": source})})
        if source == "swipes":
            why = (f"{selects:,} answers were settled on after swiping; only they are targets "
                   '(build.sft.source = "selected" takes every selected answer)')
        else:
            why = ("these logs have no swipes (no select event); every selected answer the quality filter kept "
                   "is a target")
        return config, f"sft: source auto -> {source} — {why}"
    return config, f"sft: source {source} (build.sft.source)"


def build_partition(frames: Frames, config: BuildConfig | None = None) -> tuple[dict[str, pl.DataFrame], dict[str, int]]:
    """The datasets of one partition of users: ({dataset: frame}, {skipped reason: count}).

    RM frames carry a `split` column ("train"/"eval") that `build_datasets` writes to separate files,
    and so do the RL prompts.
    """
    skipped: dict[str, int] = {}
    out: dict[str, pl.DataFrame] = {}
    for name, table in iter_partition(frames, config or BuildConfig(), skipped):
        df = pl.from_arrow(table)
        if name.startswith("rm/"):
            name, split = name.rsplit("/", 1)
            df = df.with_columns(split=pl.lit(split))
            df = pl.concat([out[name], df]) if name in out else df
        elif name == "rl":
            df = df.with_columns(split=pl.when(pl.col("_eval")).then(pl.lit("eval")).otherwise(pl.lit("train")))
        out[name] = df
    return out, skipped


def _facts(frames: Frames, skipped: dict[str, int]) -> None:
    """What `explain` needs to know about one partition's logs, added into `skipped` under `FACT`."""
    turns, events = frames["turns"], frames["events"]
    assistant = turns.filter(pl.col("role") == "assistant")
    counts = {
        "answers": assistant.filter(pl.col("selected")).height,
        "alternatives": assistant.filter(pl.col("candidate_index") > 0).height,
        "shown_alternatives": assistant.filter(pl.col("shown") & ~pl.col("selected")).height,
        "user_turns": turns.filter((pl.col("role") == "user") & pl.col("selected")).height,
        "labelled": frames["labels"].height,
    }
    by_type = dict(events.group_by("type").len().iter_rows()) if events.height else {}
    for kind in ("select", "swipe", "vote", "report"):
        counts[f"{kind}_events"] = int(by_type.get(kind, 0))
    flags = frames["target_flags"]
    for reason, n in (flags.group_by("reason").len().iter_rows() if flags.height else []):
        counts[f"flagged:{reason}"] = int(n)
    for k, v in counts.items():
        skipped[FACT + k] = skipped.get(FACT + k, 0) + v


def iter_partition(frames: Frames, config: BuildConfig, skipped: dict[str, int]) -> Iterator[tuple[str, pa.Table]]:
    """The datasets of one partition, one output at a time (so a writer can let go of each before
    the next): (name, Arrow table of its schema), RM sets as `rm/<signal>/train` and `.../eval`,
    distillation prompts with a `_key` column (`DISTILL_SPILL`) for deduplication across partitions,
    RL prompts as `rl` with `_key` and `_eval` (`RL_SPILL`).

    `sft.source = "auto"` must be decided over all the logs first (`choose_sft_source`); left
    undecided, it is decided here, on these frames taken as the whole logs."""
    if config.sft.enabled and config.sft.source == "auto":
        config, _ = choose_sft_source(config, count_selects(frames))
    ctx = _Context(frames, config)
    turns, events = frames["turns"], frames["events"]
    _facts(frames, skipped)
    flagged = frames["target_flags"].select("turn_id")
    skipped["malformed_conversations"] = skipped.get("malformed_conversations", 0) + ctx.malformed
    assistant = turns.filter(pl.col("role") == "assistant").select(
        "turn_id", "conversation_id", "parent_id", "candidate_index", "shown", "selected", "text")
    selects = events.filter(pl.col("type") == "select").select("turn_id").unique()
    chosen_swipes = assistant.filter(pl.col("selected")).join(selects, on="turn_id", how="semi")

    # Every assistant turn answering a turn on a path, in context, ending with it (sorted by turn id):
    # SFT and every scalar reward set take their rows from it, so each context is built once.
    answers = ctx.attach(ctx.at_parent(assistant.select("turn_id", "conversation_id", "parent_id")).sort("turn_id"),
                         target="turn_id")

    if config.sft.enabled:
        pool = chosen_swipes if config.sft.source == "swipes" else assistant.filter(pl.col("selected"))
        kept = pool.join(flagged, on="turn_id", how="anti")
        skipped["sft:flagged_target"] = skipped.get("sft:flagged_target", 0) + pool.height - kept.height
        rows = answers.join(kept.select("turn_id"), on="turn_id", how="semi", maintain_order="left")
        # parent missing, or a malformed conversation
        skipped["sft:not_on_a_path"] = skipped.get("sft:not_on_a_path", 0) + kept.height - rows.height
        swiped = pl.col("turn_id").is_in(selects["turn_id"].implode())
        yield "sft", ctx.materialize(rows.select(
            example_id=pl.lit("sft:") + pl.col("turn_id"), user_id="user_id", conversation_id="conversation_id",
            turn_id="turn_id", character_id="character_id",
            source=pl.when(swiped).then(pl.lit("swipe")).otherwise(pl.lit("selected")),
            messages="messages", weight="weight"), SFT)
        del rows

    want_pairs = config.dpo.enabled or (config.rm.enabled and "preference" in config.rm.signals)
    if want_pairs:
        pairs = _pairs(ctx, assistant, chosen_swipes, events, config.dpo)
        if config.dpo.enabled:
            dpo = pairs.join(flagged, left_on="chosen_turn_id", right_on="turn_id", how="anti")
            skipped["dpo:flagged_chosen"] = skipped.get("dpo:flagged_chosen", 0) + pairs.height - dpo.height
            yield "dpo", ctx.materialize(dpo, PAIRS)
            del dpo
        if config.rm.enabled and "preference" in config.rm.signals:
            yield from _splits(ctx, "rm/preference", pairs, PAIRS)
        del pairs

    scalars = [s for s in config.rm.signals if s != "preference"] if config.rm.enabled else []
    if scalars:
        signals, censored = _signals(answers, frames, assistant)
        for signal in scalars:
            frame = _scalar(signal, signals, frames, assistant, config.rm)
            censored_out = censored.get(LABEL_COLUMNS.get(signal), 0) if signal != "time_to_next" else 0
            if censored_out:
                key = f"rm/{signal}:censored"
                skipped[key] = skipped.get(key, 0) + censored_out
            yield from _splits(ctx, f"rm/{signal}", frame, SCALAR)
            del frame
        del signals

    if config.distill.enabled or config.rl.enabled:
        users = turns.filter((pl.col("role") == "user") & pl.col("selected")).select("turn_id", "conversation_id")
        at_user = users.join(ctx.index.select("turn_id", end=pl.col("idx") + 1), on="turn_id", how="inner",
                             maintain_order="left").sort("turn_id")
        prompts: pl.DataFrame | None = None
        for name in ("distill", "rl"):
            section = getattr(config, name)
            if not section.enabled:
                continue
            window = config.rl.max_context_messages if name == "rl" else None
            if prompts is None or window is not None:
                prompts = ctx.attach(at_user, window=window)
            split = ["_eval"] if name == "rl" else []
            rows = prompts.select(*split, example_id=pl.lit(f"{name}:") + pl.col("turn_id"), user_id="user_id",
                                  conversation_id="conversation_id", turn_id="turn_id", character_id="character_id",
                                  messages="messages", weight="weight")
            if section.dedup:  # the smallest example id of each distinct prompt stays
                rows = rows.with_columns(_key=ctx.key(rows))
                before = rows.height
                rows = rows.unique("_key", keep="first", maintain_order=True)
                skipped[f"{name}:duplicate"] = skipped.get(f"{name}:duplicate", 0) + before - rows.height
            else:
                rows = rows.with_columns(_key=pl.lit(None, pl.UInt64))
            yield name, ctx.materialize(rows, RL_SPILL if name == "rl" else DISTILL_SPILL)
            del rows


def _pairs(ctx: _Context, assistant: pl.DataFrame, chosen: pl.DataFrame, events: pl.DataFrame,
           config: DPOBuild) -> pl.DataFrame:
    rejected = assistant.filter(pl.col("shown") & ~pl.col("selected"))
    if config.require_swipe_event:
        swipes = events.filter(pl.col("type") == "swipe").select("turn_id").unique()
        rejected = rejected.join(swipes, on="turn_id", how="semi")
    pairs = (chosen.select("parent_id", "conversation_id", chosen_turn_id="turn_id", chosen_text="text")
             .join(rejected.select("parent_id", "candidate_index", rejected_turn_id="turn_id", rejected_text="text"),
                   on="parent_id", how="inner")
             .filter(pl.col("chosen_text").str.strip_chars() != pl.col("rejected_text").str.strip_chars())
             .sort("chosen_turn_id", "candidate_index"))
    if config.max_pairs_per_prompt:
        pairs = pairs.filter(pl.int_range(pl.len()).over("chosen_turn_id") < config.max_pairs_per_prompt)
    rows = ctx.attach(ctx.at_parent(pairs.drop("chosen_text", "rejected_text")), name="prompt")
    rows = ctx.one(ctx.one(rows, "chosen_turn_id", "chosen"), "rejected_turn_id", "rejected")
    split = ["_eval"] if "_eval" in rows.columns else []  # the reward models' split, when they are built
    return rows.select(
        *split, example_id=pl.lit("pair:") + pl.col("chosen_turn_id") + pl.lit(">") + pl.col("rejected_turn_id"),
        user_id="user_id", conversation_id="conversation_id", parent_id="parent_id",
        chosen_turn_id="chosen_turn_id", rejected_turn_id="rejected_turn_id", prompt="prompt",
        chosen="chosen", rejected="rejected", weight="weight")


LABEL_COLUMNS = {"continue": "continued", "turns_after": "turns_after", "time_to_next": "time_to_next_user_message",
                 "returned_1d": "returned_1d", "returned_7d": "returned_7d"}


def _signals(answers: pl.DataFrame, frames: Frames, assistant: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """`answers` with every scalar signal's raw value beside it: the derived labels (`_labelled`:
    the turn has a label row), the turn's last vote, whether it was reported, whether it was shown.
    Joined once here, so that each reward set is a filter of it rather than two joins. Also the
    censored (null) count of each label column over every labelled assistant turn, on a path or not."""
    events = frames["events"]
    labelled = frames["labels"].join(assistant.select("turn_id"), on="turn_id", how="semi")
    censored = {c: labelled[c].null_count() for c in LABEL_COLUMNS.values()}
    labels = frames["labels"].select("turn_id", *LABEL_COLUMNS.values(), _labelled=pl.lit(True))
    votes = (events.filter(pl.col("type") == "vote").sort("timestamp")
             .group_by("turn_id").agg(_vote=pl.col("value").last()))
    reports = events.filter(pl.col("type") == "report").select("turn_id").unique().with_columns(_reported=pl.lit(True))
    return (answers.join(labels, on="turn_id", how="left", maintain_order="left")
            .join(votes, on="turn_id", how="left", maintain_order="left")
            .join(reports, on="turn_id", how="left", maintain_order="left")
            .join(assistant.select("turn_id", _shown="shown"), on="turn_id", how="left", maintain_order="left")
            ), censored


def _scalar(signal: str, signals: pl.DataFrame, frames: Frames, assistant: pl.DataFrame, config: RMBuild
            ) -> pl.DataFrame:
    """The rows of `rm/<signal>`, with the split flag `_eval`. `signals`: every assistant turn in
    context with its raw signals (`_signals`, sorted by turn id)."""
    if signal == "thumbs":
        rows = signals.filter(pl.col("_vote").is_not_null() & (pl.col("_vote") != 0)).with_columns(
            label=pl.col("_vote"), censored=pl.lit(False))
    elif signal == "safety":
        rows = signals.filter(pl.col("_shown")).with_columns(
            label=pl.when(pl.col("_reported")).then(1.0).otherwise(0.0), censored=pl.lit(False))
        if config.safety_negatives_per_positive is not None:
            # Which negatives stay is decided over every shown answer, on a path or not.
            events = frames["events"]
            reported = events.filter(pl.col("type") == "report").select("turn_id").unique()
            shown = assistant.filter(pl.col("shown")).select("turn_id")
            positives = shown.join(reported, on="turn_id", how="semi")
            neg = shown.join(reported, on="turn_id", how="anti")
            neg = neg.with_columns(_h=hash_column(neg, "turn_id", "safety", unique=False)).sort("_h")
            keep = pl.concat([positives, neg.head(int(np.ceil(config.safety_negatives_per_positive
                                                              * positives.height))).select("turn_id")])
            rows = rows.join(keep, on="turn_id", how="semi", maintain_order="left")
    else:
        column = LABEL_COLUMNS[signal]
        rows = signals.filter(pl.col("_labelled")).with_columns(label=pl.col(column).cast(pl.Float64))
        if signal == "time_to_next":
            rows = rows.with_columns(censored=pl.col("label").is_null())
        else:
            rows = rows.filter(pl.col("label").is_not_null()).with_columns(censored=pl.lit(False))
    return rows.select(
        example_id=pl.lit(f"{signal}:") + pl.col("turn_id"), user_id="user_id", conversation_id="conversation_id",
        turn_id="turn_id", messages="messages", label=pl.col("label").cast(pl.Float64), censored="censored",
        weight="weight", _eval="_eval")


def is_eval(user_ids: pl.Series, config: RMBuild) -> pl.Series:
    """Whether each user id is in the reward models' eval split: a stable hash, so a user is on one
    side in every dataset, partition and run."""
    h = hash_column(pl.DataFrame({"user_id": user_ids}), "user_id", config.salt).to_numpy()
    return pl.Series("_eval", unit_interval(h) < config.eval_fraction)


def split_of(user_ids: pl.Series, eval_fraction: float, salt: str) -> pl.Series:
    """'eval' or 'train' per user id (see `is_eval`)."""
    flag = is_eval(user_ids, RMBuild(eval_fraction=eval_fraction, salt=salt))
    return pl.select(split=pl.when(flag).then(pl.lit("eval")).otherwise(pl.lit("train")))["split"]


def _splits(ctx: _Context, name: str, df: pl.DataFrame, schema: pa.Schema) -> Iterator[tuple[str, pa.Table]]:
    """`name/train` and `name/eval`: the rows split by user (their `_eval` flag), each materialized."""
    for split, flag in (("train", ~pl.col("_eval")), ("eval", pl.col("_eval"))):
        yield f"{name}/{split}", ctx.materialize(df.filter(flag), schema)


# --- writing -----------------------------------------------------------------------------------


@dataclass
class BuildReport:
    """Rows (and distinct users) per output file, what was skipped and why, facts about the logs,
    the label range of each scalar set, one line per dataset that cannot train (`notes`), the files."""

    datasets: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    facts: dict[str, int] = field(default_factory=dict)
    labels: dict[str, dict[str, float]] = field(default_factory=dict)  # per scalar file: rows, min, max
    notes: list[dict[str, str]] = field(default_factory=list)  # dataset, kind, line (see `explain`)
    files: list[str] = field(default_factory=list)
    partitions: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"datasets": self.datasets, "skipped": self.skipped, "notes": self.notes, "facts": self.facts,
                "labels": self.labels, "files": self.files, "partitions": self.partitions,
                "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        lines = [f"{'dataset':<28} {'rows':>9} {'users':>7}"]
        for name, d in self.datasets.items():
            lines.append(f"{name:<28} {d['rows']:>9} {d['users']:>7}")
        if any(self.skipped.values()):
            lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in self.skipped.items() if v))
        return "\n".join(lines)

    def lines(self, kinds: Iterable[str] | None = None) -> list[str]:
        """The notes' lines (of these kinds only, if given)."""
        wanted = None if kinds is None else set(kinds)
        return [n["line"] for n in self.notes if wanted is None or n["kind"] in wanted]



PARQUET: dict[str, Any] = {"compression": "zstd", "compression_level": 1, "row_group_size": 122_880}
"""How dataset files are written: zstd at level 1, row groups of 122,880 rows, min/max statistics
on every column (pyarrow's default), no dictionary encoding (the columns are ids and texts, nearly
all distinct: measured on the bench's datasets, files come out 3% smaller and writing 15% faster)."""


JSONL_ALWAYS = ("rl/",)
"""Datasets written as JSONL whatever `build.formats` says: the RL stage reads its prompts from
JSONL (`env.prompts`), so a recipe can point at the built file as it is."""


class _Sinks:
    """One file per (dataset, format), appended partition by partition; each appears atomically.

    Encoding and compressing happen on background threads (pyarrow lets go of the GIL), so writing
    overlaps building the next dataset: two writers (one where pyarrow may use a single core),
    appends to one file in the order they came; at most `backlog` writes wait at a time.
    """

    def __init__(self, out_dir: Path, formats: list[str], backlog: int = 2):
        self.out_dir = out_dir
        self.formats = formats
        self.stack = contextlib.ExitStack()
        self.tmp: dict[Path, Path] = {}
        self.writers: dict[Path, Any] = {}
        self.schemas: dict[Path, pa.Schema] = {}
        self.pool = ThreadPoolExecutor(max_workers=min(2, pa.cpu_count()), thread_name_prefix="alignloop-build-writer")
        self.pending: list[Any] = []
        self.last: dict[Path, Any] = {}  # each file's latest append: the next one waits for it
        self.backlog = backlog

    def files(self, name: str) -> list[Path]:
        formats = [*self.formats, *(["jsonl"] if name.startswith(JSONL_ALWAYS) and "jsonl" not in self.formats
                                    else [])]
        return [self.out_dir / f"{name}.{'parquet' if f == 'parquet' else 'jsonl'}" for f in formats]

    def open(self, name: str, schema: pa.Schema) -> None:
        for path in self.files(name):
            if path in self.tmp:
                continue
            self.tmp[path] = self.stack.enter_context(atomic_path(path))
            self.schemas[path] = schema
            if path.suffix == ".parquet":
                self.writers[path] = pq.ParquetWriter(self.tmp[path], schema, compression=PARQUET["compression"],
                                                      compression_level=PARQUET["compression_level"],
                                                      use_dictionary=False)
            else:
                self.writers[path] = open(self.tmp[path], "wb")  # noqa: SIM115 (closed in close())

    def write(self, name: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        for path in self.files(name):
            job = self.pool.submit(self._append, path, _to_schema(table, self.schemas[path]), self.last.get(path))
            self.last[path] = job
            self.pending.append(job)
        while len(self.pending) > self.backlog:
            self.pending.pop(0).result()

    def _append(self, path: Path, table: pa.Table, previous: Any) -> None:
        if previous is not None:  # submitted (so started) earlier: rows stay in partition order
            previous.result()
        if path.suffix == ".parquet":
            self.writers[path].write_table(table, PARQUET["row_group_size"])
        else:
            pl.from_arrow(table).write_ndjson(self.writers[path])

    def _drain(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def close(self) -> list[Path]:
        self._drain()
        self.pool.shutdown()
        for w in self.writers.values():
            w.close()
        self.stack.close()
        return sorted(self.tmp)

    def abort(self, exc: BaseException) -> None:
        for job in self.pending:
            with contextlib.suppress(Exception):
                job.result()
        self.pool.shutdown()
        for w in self.writers.values():
            with contextlib.suppress(Exception):
                w.close()
        self.stack.__exit__(type(exc), exc, exc.__traceback__)


def _to_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    if table.schema == schema:
        return table
    table = table.select(schema.names)
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema], schema=schema)


def _outputs(config: BuildConfig) -> dict[str, pa.Schema]:
    names: dict[str, pa.Schema] = {}
    if config.sft.enabled:
        names["sft"] = SFT
    if config.dpo.enabled:
        names["dpo"] = PAIRS
    if config.rm.enabled:
        for s in config.rm.signals:
            for split in ("train", "eval"):
                names[f"rm/{s}/{split}"] = PAIRS if s == "preference" else SCALAR
    if config.distill.enabled:
        names["distill"] = DISTILL
    if config.rl.enabled:
        for split in ("train", "eval"):
            names[f"rl/{split}"] = RL
    return names


PROMPT_SETS = ("distill", "rl")
"""Prompt datasets, deduplicated and capped at the end over every partition (from a spill file)."""


class DatasetWriter:
    """Every dataset of one build, appended piece by piece (in partition order) into its files,
    with the `BuildReport`. `build_datasets` feeds it from `iter_partition` in this process; the Ray
    engine feeds it the pieces its tasks built.

    Prompt sets (distillation, RL) are deduplicated across partitions and capped at the end, from a
    spill file each (Arrow IPC: written and read back at disk speed), so that which prompt stays
    never depends on how users were partitioned. With `hold`, their pieces are held in memory
    instead (for builds whose logs are in memory anyway: 1M events, ~330 MB not written and read
    back).

    `sft_choice`: the line `choose_sft_source` gave; `close` adds it, and a line for every dataset
    that came out empty or with a constant label, to the report's notes (`explain`).
    """

    def __init__(self, out_dir: str | Path, config: BuildConfig, partitions: int, sft_choice: str | None = None,
                 hold: bool = False):
        self.out_dir = Path(out_dir)
        self.config = config
        self.sft_choice = sft_choice
        outputs = _outputs(config)
        self.report = BuildReport(datasets={name: {"rows": 0, "users": 0} for name in outputs}, partitions=partitions)
        self.sinks = _Sinks(self.out_dir, list(config.formats))
        self._spills: dict[str, Any] = {}
        self._keys: dict[str, list[pa.Table]] = {}  # per prompt set: what dedup and caps decide on
        self._held: dict[str, list[pa.Table]] | None = {} if hold else None
        try:
            for name, schema in outputs.items():
                self.sinks.open(name, schema)
        except BaseException as e:
            self.sinks.abort(e)
            raise

    def _spill_path(self, name: str) -> Path:
        return self.out_dir / f".{name}-spill.arrow"

    def add(self, name: str, table: pa.Table) -> None:
        """One piece of dataset `name` (as `iter_partition` yields it)."""
        if name in PROMPT_SETS:
            section = getattr(self.config, name)
            order = (hash_strings(table.column("example_id"), name) if section.max_prompts is not None
                     else np.zeros(table.num_rows, dtype=np.uint64))
            # What dedup and caps decide on stays here (a few small columns); the rest waits, held
            # or spilled, until they have decided.
            keys = table.select(["example_id", "user_id", "_key", *(["_eval"] if name == "rl" else [])])
            self._keys.setdefault(name, []).append(keys.append_column("_h", pa.array(order, pa.uint64())))
            table = table.drop_columns(["_key"])
            if self._held is not None:
                self._held.setdefault(name, []).append(table)
            else:
                if name not in self._spills:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                    self._spills[name] = pa.ipc.new_file(str(self._spill_path(name)), table.schema)
                self._spills[name].write_table(table)
        else:
            self._emit(name, table)

    def add_skipped(self, skipped: Mapping[str, int]) -> None:
        for k, v in skipped.items():
            into = self.report.facts if k.startswith(FACT) else self.report.skipped
            key = k.removeprefix(FACT)
            into[key] = into.get(key, 0) + v

    def close(self) -> BuildReport:
        emitters: list[Generator[None, None, None]] = []
        try:
            for name in list(self._spills):
                self._spills.pop(name).close()
            emitters = [self._emit_prompts(name) for name in PROMPT_SETS if name in self._keys]
            # Batch by batch, the sets taking turns: consecutive appends go to different files, so
            # both writer threads have work (one file's appends wait for each other).
            while emitters:
                for emitter in list(emitters):
                    if next(emitter, StopIteration) is StopIteration:
                        emitters.remove(emitter)
        except BaseException as e:
            for emitter in emitters:
                emitter.close()
            self.abort(e)
            raise
        for name in PROMPT_SETS:
            self._spill_path(name).unlink(missing_ok=True)
        self.report.files = [str(p) for p in self.sinks.close()]
        self.report.notes = explain(self.report, self.config, self.sft_choice)
        return self.report

    def abort(self, exc: BaseException) -> None:
        for spill in self._spills.values():
            with contextlib.suppress(Exception):
                spill.close()
        self._spills.clear()
        self._keys.clear()
        if self._held is not None:
            self._held.clear()
        for name in PROMPT_SETS:
            self._spill_path(name).unlink(missing_ok=True)
        self.sinks.abort(exc)

    def _emit(self, name: str, table: pa.Table, count_users: bool = True) -> None:
        self.sinks.write(name, table)
        entry = self.report.datasets[name]
        entry["rows"] += table.num_rows
        # Partitions split users, so each user counts in one piece only.
        if count_users:
            entry["users"] += pc.count_distinct(table.column("user_id")).as_py() if table.num_rows else 0
        if "label" in table.column_names:
            stats = self.report.labels.setdefault(name, {"rows": 0, "min": None, "max": None})
            label = table.column("label")
            stats["rows"] += table.num_rows - label.null_count
            bounds = pc.min_max(label).as_py()
            for k, pick in (("min", min), ("max", max)):
                if bounds[k] is not None:
                    stats[k] = bounds[k] if stats[k] is None else pick(stats[k], bounds[k])

    def _emit_prompts(self, name: str) -> Generator[None, None, None]:
        """Deduplicate and cap prompt set `name` over every partition, then append its held or
        spilled pieces' rows that stay, one batch per step (a generator: `close` interleaves the
        sets)."""
        section = getattr(self.config, name)
        split = name == "rl"
        keys = pl.from_arrow(pa.concat_tables(self._keys.pop(name))).with_row_index("_row")
        if section.dedup:
            winners = keys.sort("example_id").unique("_key", keep="first")
            self.add_skipped({f"{name}:duplicate": keys.height - winners.height})
        else:
            winners = keys
        if section.max_prompts is not None:
            # A cap per split for RL prompts: a small held-out split stays whole.
            groups = winners.partition_by("_eval") if split and winners.height else [winners]
            capped = [g.sort("_h").head(section.max_prompts) for g in groups]
            over = winners.height - sum(g.height for g in capped)
            if over:
                self.report.skipped[f"{name}:over_max_prompts"] = over
                winners = pl.concat(capped)
        everything = winners.height == keys.height
        # Counted here: the spill's batches are not user partitions (a user's prompts may span two).
        for out, users in (winners.group_by("_eval").agg(pl.col("user_id").n_unique()).iter_rows() if split
                           else [(None, winners["user_id"].n_unique())]):
            self.report.datasets[name if out is None else f"{name}/{'eval' if out else 'train'}"]["users"] = users
        keep = np.zeros(keys.height, dtype=bool)  # by position in the spill: no string lookups
        keep[winners["_row"].to_numpy()] = True
        del keys, winners
        start = 0
        for piece in self._pieces(name):
            rows, start = keep[start:start + piece.num_rows], start + piece.num_rows
            if not everything:
                piece = piece.filter(pa.array(rows))
            if split:
                held = piece.column("_eval")
                piece = piece.drop_columns(["_eval"])
                self._emit(f"{name}/train", piece.filter(pc.invert(held)), count_users=False)
                self._emit(f"{name}/eval", piece.filter(held), count_users=False)
            else:
                self._emit(name, piece, count_users=False)
            yield

    def _pieces(self, name: str) -> Iterator[pa.Table]:
        """Prompt set `name` as it was added, piece by piece: held in memory, or from its spill."""
        if self._held is not None:
            held = self._held.pop(name, [])
            while held:
                yield held.pop(0)  # let go of each once it is written
            return
        # Read, not memory-mapped: mapped pages would count as resident memory; one piece at a time.
        with pa.OSFile(str(self._spill_path(name))) as source:
            spilled = pa.ipc.open_file(source)
            for i in range(spilled.num_record_batches):
                yield pa.Table.from_batches([spilled.get_batch(i)])


# --- why a dataset cannot train ----------------------------------------------------------------

_NO_SWIPES = "these logs have no swipes (no turn has more than one candidate)"


def _rows(report: BuildReport, name: str) -> int:
    return sum(report.datasets.get(f"{name}/{s}", {}).get("rows", 0) for s in ("train", "eval")) \
        if name.startswith(("rm/", "rl")) else report.datasets.get(name, {}).get("rows", 0)


def _fmt(value: float, signal: str) -> str:
    if signal == "thumbs":
        return f"{value:+g}"
    return f"{value:g}"


def _why_no_pairs(report: BuildReport, config: BuildConfig) -> str:
    facts = report.facts
    if not facts.get("alternatives", 0):
        return _NO_SWIPES
    if not facts.get("shown_alternatives", 0):
        return f"none of the {facts['alternatives']:,} alternative answers was shown to the user"
    if not facts.get("select_events", 0):
        return (f"{facts['shown_alternatives']:,} shown alternatives, but no select event says which answer "
                "the user settled on")
    if config.dpo.require_swipe_event and not facts.get("swipe_events", 0):
        return "build.dpo.require_swipe_event is on and no swipe event survived filtering"
    return ("no answer the user settled on has a shown sibling with different text "
            f"({facts['shown_alternatives']:,} shown alternatives, {facts['select_events']:,} select events)")


def _why_no_scalar(signal: str, report: BuildReport) -> str:
    facts = report.facts
    if signal == "thumbs":
        return "no thumbs in these logs (no +1/-1 vote on an answer in context)"
    censored = report.skipped.get(f"rm/{signal}:censored", 0)
    if signal in ("returned_1d", "returned_7d") and censored:
        days = signal.removeprefix("returned_").removesuffix("d")
        return f"all {censored:,} outcomes are censored (the logs end within {days} day(s) of every answer)"
    if not facts.get("answers", 0):
        return "these logs have no selected assistant answer"
    return f"no label for any of the {facts['answers']:,} selected answers"


def _why_constant(signal: str, value: float, report: BuildReport) -> str:
    if signal == "safety" and value == 0:
        return "no safety flags in these logs (no report event)"
    if signal == "thumbs":
        return f"only thumbs {'up' if value > 0 else 'down'} in these logs"
    censored = report.skipped.get(f"rm/{signal}:censored", 0)
    if signal in ("returned_1d", "returned_7d") and value == 1 and censored:
        days = signal.removeprefix("returned_").removesuffix("d")
        return (f"only returns are observed: the logs end less than {days} day(s) after the other {censored:,} "
                "answers, whose outcomes are censored")
    return "every answer has the same outcome"


def explain(report: BuildReport, config: BuildConfig, sft_choice: str | None = None) -> list[dict[str, str]]:
    """One line per dataset that came out empty, or whose label is constant (nothing for a head to
    learn), with the reason read off the logs; plus the SFT source line. Each note is
    {"dataset", "kind", "line"}, kind one of: choice, empty, constant, empty_train, empty_eval."""
    notes: list[dict[str, str]] = []

    def note(dataset: str, kind: str, line: str) -> None:
        notes.append({"dataset": dataset, "kind": kind, "line": line})

    facts = report.facts
    if config.sft.enabled:
        if sft_choice:
            note("sft", "choice", sft_choice)
        if not _rows(report, "sft"):
            flagged = report.skipped.get("sft:flagged_target", 0)
            if config.sft.source == "swipes" and not facts.get("select_events", 0):
                why = ('build.sft.source = "swipes" but these logs have no swipes (no select event); '
                       '"auto" or "selected" takes every selected answer')
            elif flagged:
                reasons = ", ".join(f"{k.removeprefix('flagged:')} {v:,}" for k, v in sorted(facts.items())
                                    if k.startswith("flagged:") and v)
                why = f"the quality filter flagged all {flagged:,} candidate answers ({reasons})"
            elif not facts.get("answers", 0):
                why = "these logs have no selected assistant answer"
            else:
                why = "no candidate answer sits on a well-formed conversation path"
            note("sft", "empty", f"sft: 0 examples — {why}; SFT needs target answers")
    pairs_wanted = [n for n, on in (("dpo", config.dpo.enabled),
                                    ("rm/preference", config.rm.enabled and "preference" in config.rm.signals)) if on]
    for name in pairs_wanted:
        if _rows(report, name):
            continue
        flagged = report.skipped.get("dpo:flagged_chosen", 0)
        why = (f"the quality filter flagged the chosen answer of all {flagged:,} pairs" if name == "dpo" and flagged
               else _why_no_pairs(report, config))
        needs = "DPO needs" if name == "dpo" else "the preference head needs"
        tail = f"{needs} swiped or regenerated answers" if why == _NO_SWIPES else \
            ("DPO has nothing to train on" if name == "dpo" else "the preference head will not train")
        note(name, "empty", f"{name}: 0 pairs — {why}; {tail}")
    if config.rm.enabled:
        fraction = config.rm.eval_fraction
        for signal in config.rm.signals:
            name = f"rm/{signal}"
            unit = "pairs" if signal == "preference" else "rows"
            total = _rows(report, name)
            if signal != "preference" and not total:
                note(name, "empty", f"{name}: 0 rows — {_why_no_scalar(signal, report)}; the {signal} head will not "
                                    "train")
                continue
            if not total:
                continue  # preference: said above
            train = report.datasets[f"{name}/train"]["rows"]
            if not train:
                note(name, "empty_train", f"{name}: 0 train {unit} — all {total:,} belong to held-out users "
                                          f"(build.rm.eval_fraction = {fraction:g}); the {signal} head will not train")
                continue
            if signal != "preference":
                stats = [report.labels.get(f"{name}/{s}", {}) for s in ("train", "eval")]
                lows = [x["min"] for x in stats if x.get("min") is not None]
                highs = [x["max"] for x in stats if x.get("max") is not None]
                t = stats[0]
                if lows and min(lows) == max(highs):
                    n = sum(x.get("rows", 0) for x in stats)
                    value = min(lows)
                    note(name, "constant", f"{name}: label constant {_fmt(value, signal)} over {n:,} rows — "
                                           f"{_why_constant(signal, value, report)}; the {signal} head will not train")
                    continue
                if t.get("min") is not None and t["min"] == t["max"]:
                    note(name, "constant", f"{name}: label constant {_fmt(t['min'], signal)} over its {t['rows']:,} "
                                           "train rows (the other values are all held-out users'); the "
                                           f"{signal} head will not train")
                    continue
            if not report.datasets[f"{name}/eval"]["rows"]:
                note(name, "empty_eval", f"{name}: 0 eval {unit} — no held-out user has one "
                                         f"(build.rm.eval_fraction = {fraction:g}); the {signal} head cannot be "
                                         "evaluated")
    if config.distill.enabled and not _rows(report, "distill"):
        note("distill", "empty", "distill: 0 prompts — no user message sits on a well-formed conversation path")
    if config.rl.enabled:
        if not _rows(report, "rl"):
            note("rl", "empty", "rl: 0 prompts — no user message sits on a well-formed conversation path; "
                                "RL has no prompts from these logs")
        elif not report.datasets["rl/eval"]["rows"]:
            note("rl", "empty_eval", f"rl: 0 eval prompts — no held-out user "
                                     f"(build.rm.eval_fraction = {config.rm.eval_fraction:g})")
        elif not report.datasets["rl/train"]["rows"]:
            note("rl", "empty_train", "rl: 0 train prompts — every prompt belongs to a held-out user "
                                      f"(build.rm.eval_fraction = {config.rm.eval_fraction:g})")
    return notes


def build_datasets(filtered: Mapping[str, pa.Table | pl.DataFrame] | str | Path, config: BuildConfig | None = None,
                   out_dir: str | Path = "datasets", workers: int | None = None) -> BuildReport:
    """Build every enabled dataset from filtered logs (tables, or a folder of them) into `out_dir`.

    Tables in memory are built `workers` pieces at a time (default: Polars' thread count; see
    `built_pieces`); a partitioned folder one partition at a time, so memory follows the partition."""
    config = config or BuildConfig()
    t0 = time.perf_counter()
    config, sft_choice = choose_sft_source(config, count_selects(filtered)) if config.sft.enabled else (config, None)
    if isinstance(filtered, (str, Path)) and partitions_in(filtered):
        # Written by the filter stage partition by partition: read (and hold) one at a time.
        folder, n = Path(filtered), partitions_in(filtered)
        parts: Iterable[Frames] = (prepare(read_partition(folder, k, FILTERED_SCHEMAS)) for k in range(n))
        workers, in_memory = 1, False
    else:
        tables = read_tables(filtered, FILTERED_SCHEMAS) if isinstance(filtered, (str, Path)) else filtered
        n = config.partitions
        parts = split_partitions(prepare(tables), n)
        workers, in_memory = workers or pl.thread_pool_size(), True
    # Logs in memory: the prompt sets' pieces are held in memory too, not spilled to disk.
    writer = DatasetWriter(out_dir, config, n, sft_choice, hold=in_memory)
    try:
        pieces = (piece for part in parts for piece in bounded_partitions(part, config.events_per_partition))
        for tables_of_piece, skipped in built_pieces(pieces, config, workers):
            for name, table in tables_of_piece:
                writer.add(name, table)
                del table
            writer.add_skipped(skipped)
    except BaseException as e:
        writer.abort(e)
        raise
    report = writer.close()
    report.seconds = time.perf_counter() - t0
    return report


def built_pieces(pieces: Iterable[Frames], config: BuildConfig, workers: int = 1
                 ) -> Iterator[tuple[Iterable[tuple[str, pa.Table]], dict[str, int]]]:
    """Each piece's datasets (`iter_partition`) and skip counts, in piece order. The skip counts
    are complete once its datasets have been consumed.

    One worker: built as they are consumed, one dataset in memory at a time. More: that many pieces
    are built side by side on threads (Polars, numpy and pyarrow let go of the GIL), each into a
    list, and handed over in order. One piece's chain of joins, sorts and gathers, with the writer
    threads behind it, kept ~1.7 of 2 cores busy; two side by side a little more (1M events, 3
    pieces, 2 cores: 5.3-5.6 s against 5.9-6.8 in one window, the same in another: this VM's noise
    is as large). The cost: up to `workers` + 1 pieces' datasets in memory at once."""
    if workers <= 1:
        for piece in pieces:
            skipped: dict[str, int] = {}
            yield iter_partition(piece, config, skipped), skipped
        return

    def build(piece: Frames) -> tuple[list[tuple[str, pa.Table]], dict[str, int]]:
        counts: dict[str, int] = {}
        return list(iter_partition(piece, config, counts)), counts

    todo = iter(pieces)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="alignloop-build") as pool:
        window = deque(pool.submit(build, piece) for piece in islice(todo, workers))
        while window:
            done = window.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:  # before handing `done` over: the workers stay busy while it is written
                window.append(pool.submit(build, nxt))
            yield done


def bounded_partitions(part: Frames, events_per_partition: int) -> list[Frames]:
    """A partition, cut further (by user, in memory) when it has more events than the bound:
    examples carry their whole context, so they take many times the memory of the logs."""
    n = -(-part["events"].height // events_per_partition)
    return split_partitions(part, n) if n > 1 else [part]
