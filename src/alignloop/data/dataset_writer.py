"""Where built datasets land: one file per (dataset, format), appended piece by piece in partition
order (`DatasetWriter`), the prompt sets deduplicated and capped over every partition at the end,
and the `BuildReport`: rows and users per file, what was skipped and why, and one line for every
dataset that cannot train (`explain`).

`builders.build_datasets` feeds the writer in this process; the Ray engine feeds it the pieces its
tasks built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alignloop.data.build_config import DISTILL, PAIRS, RL, SCALAR, SFT, BuildConfig
from alignloop.data.stablehash import hash_strings
from alignloop.runs import atomic_path

FACT = "logs:"
"""Prefix of the counts `iter_partition` adds beside its skip counts: facts about the logs that
explain an empty dataset or a constant label (`explain`), summed over partitions like the rest."""


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
