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
The schemas and the `[build]` section live in `build_config`, the writer and the report in
`dataset_writer`; this module re-exports them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from alignloop.data.build_config import (
    DATASET_SCHEMAS,
    DISTILL,
    MESSAGE,
    MESSAGES,
    PAIRS,
    RL,
    SCALAR,
    SFT,
    SIGNALS,
    BuildConfig,
    DistillBuild,
    DPOBuild,
    RLBuild,
    RMBuild,
    SFTBuild,
    Signal,
)
from alignloop.data.dataset_writer import (
    FACT,
    JSONL_ALWAYS,
    PARQUET,
    PROMPT_SETS,
    BuildReport,
    DatasetWriter,
    explain,
)
from alignloop.data.filters import FILTERED_SCHEMAS, Frames, prepare, split_partitions
from alignloop.data.io import read_table, read_tables
from alignloop.data.parts import partitions_in, read_partition
from alignloop.data.stablehash import hash_column, unit_interval

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


def build_datasets(filtered: Mapping[str, pa.Table | pl.DataFrame] | str | Path, config: BuildConfig | None = None,
                   out_dir: str | Path = "datasets", workers: int | None = None) -> BuildReport:
    """Build every enabled dataset from filtered logs (tables, or a folder of them) into `out_dir`.

    Tables in memory are built `workers` pieces at a time (default: Polars' thread count; see
    `built_pieces`), and so is a folder the filter stage wrote from memory; a folder it streamed
    in partitions is built one partition at a time, so memory follows the partition."""
    config = config or BuildConfig()
    t0 = time.perf_counter()
    config, sft_choice = choose_sft_source(config, count_selects(filtered)) if config.sft.enabled else (config, None)
    if isinstance(filtered, (str, Path)) and builds_streamed(filtered):
        # Streamed by the filter stage partition by partition: read (and hold) one at a time.
        folder, n = Path(filtered), partitions_in(filtered) or 1
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


def builds_streamed(folder: str | Path) -> bool:
    """Whether `build_datasets` reads this filtered folder one partition at a time: the filter
    stage streamed it in several. One partition was filtered in memory, and is built in memory."""
    return (partitions_in(folder) or 1) > 1


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


# Re-exported: the schemas, the config and the writer were born here, and are imported from here.
__all__ = [
    "DATASET_SCHEMAS", "DISTILL", "DISTILL_SPILL", "FACT", "JSONL_ALWAYS", "MESSAGE", "MESSAGES", "PAIRS", "PARQUET",
    "PROMPT_SETS", "RL", "RL_SPILL", "SCALAR", "SFT", "SIGNALS", "BuildConfig", "BuildReport", "DPOBuild",
    "DatasetWriter", "DistillBuild", "RLBuild", "RMBuild", "SFTBuild", "Signal", "bounded_partitions",
    "build_datasets", "build_partition", "builds_streamed", "built_pieces", "choose_sft_source", "count_selects",
    "explain", "is_eval", "iter_partition", "split_of",
]
