"""The peer of `alignloop bench logs`: the log filters and dataset builders written in DuckDB SQL.

The same stages as `alignloop.data.filters` and `alignloop.data.builders`, with every knob of
`FilterConfig` and `BuildConfig` honoured, written the way a DuckDB user would: the log tables
loaded with `read_parquet` into tables of one in-memory database, each filter a few SQL statements
(window functions for ranks, gaps and repeats, `DELETE` for what it drops), each dataset one
`COPY (query) TO '....parquet'` whose messages are built with list functions (`list(... ORDER
BY)`, `list_slice`, `||`), and the RL prompts once more to JSONL (`FORMAT json`), as ours writes
them. No per-row Python anywhere.

Three things are not SQL, because they *define* which rows come out rather than how fast, and
SQL cannot reproduce them bit for bit; DuckDB hands the column over (Arrow), the same Python
routines ours calls compute them, and the result comes back as a registered Arrow table:

- the stable string hash (`alignloop.data.stablehash`): which users land in eval, which
  conversations a cap keeps (diversity, user_cap), the safety-negative and distill-prompt caps;
- the repeat filter's MinHash: the word shingles hashed by Polars' seeded hash, permuted and
  banded by `alignloop.data.neardup` (DuckDB normalises the texts and keeps the long enough ones);
- the share-cap arithmetic `filters.share_caps` (on a dict of a few counts per round).

Two inherent differences of the engines, neither of which shows on text whose letters are ASCII
(the simulated logs: ASCII and emoji); the bench checks the outputs row for row either way:
- regexes run in RE2 here and in Rust's regex in ours; they agree on every pattern used except
  `\\b` (the unsafe lexicon, the topic keywords): a word boundary for ASCII letters in RE2, for
  every Unicode letter in Rust;
- `lower` maps letter to letter ('İ' -> 'i', every 'Σ' -> 'σ'), Polars' `to_lowercase` follows
  Unicode's full rules ('İ' -> 'i̇', a final 'Σ' -> 'ς').

Where ours compares by a 64-bit hash (sentences, conversation paths), so does this side (`hash`):
partitioning by the strings or lists themselves costs 1.4 to 2.3 times as much in DuckDB.

Settings, as DuckDB's documentation recommends them: `threads` set to the bench's thread count,
`preserve_insertion_order = false` (no output here depends on row order, and keeping it costs
memory and time on writes), the default memory limit (80% of RAM). Parquet files are written with
the settings `parquet` gives (the bench passes ours: codec, level, row group size). DuckDB writes
min/max statistics on every column, and so does ours; it dictionary-encodes the columns with few
distinct values (its default), ours encodes none (nearly every column is ids or texts).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from alignloop.data.builders import BuildConfig
from alignloop.data.filters import (
    EDGE_CHARS,
    SENTENCE_BREAK,
    BotConfig,
    DiversityConfig,
    FilterConfig,
    MinReadingConfig,
    QualityConfig,
    RepeatConfig,
    UserCapConfig,
    share_caps,
)
from alignloop.data.filters.base import TABLE_ORDER
from alignloop.data.neardup import NON_WORD, lsh_groups, minhash, shingles
from alignloop.data.schema import LOG_SCHEMAS
from alignloop.data.stablehash import hash_strings, unit_interval

# Unicode White_Space (what Polars' `strip_chars()` strips): \t..\r, U+0085 and the separators \p{Z}.
WHITESPACE = r"[\t-\r\x{85}\p{Z}]"


def lit(text: str) -> str:
    """A SQL string literal (no backslash escapes in DuckDB's standard strings: regexes go as they are)."""
    return "'" + text.replace("'", "''") + "'"


def char_class(chars: str) -> str:
    """An RE2 character class of exactly these characters."""
    return "[" + "".join("\\" + ch if ch in "\\]^-[" else ch for ch in chars) + "]"


def strip(expr: str, chars: str = WHITESPACE) -> str:
    """`expr` without leading and trailing `chars` (a character class). An anchored regex: DuckDB's
    `trim(s, characters)` costs about three times as much here (it walks the whole string)."""
    return f"regexp_replace({expr}, {lit(f'^{chars}+|{chars}+$')}, '', 'g')"


@dataclass(frozen=True)
class ParquetSettings:
    """How every dataset file is written (the bench gives both sides the same)."""

    compression: str = "zstd"
    compression_level: int | None = 1
    row_group_size: int = 122_880

    def copy_options(self) -> str:
        level = f", COMPRESSION_LEVEL {self.compression_level}" if self.compression_level is not None else ""
        return f"FORMAT parquet, COMPRESSION {self.compression}{level}, ROW_GROUP_SIZE {self.row_group_size}"


def connect(threads: int) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory database with the bench's thread count."""
    return duckdb.connect(config={"threads": threads, "preserve_insertion_order": False})


def load_logs(con: duckdb.DuckDBPyConnection, folder: str | Path) -> None:
    """The log tables of a Parquet log folder (labels included) as tables, plus `weights` (1 for
    every conversation), an empty `target_flags` and the `dropped` record of every filter's decisions."""
    folder = Path(folder)
    for name in (*LOG_SCHEMAS, "labels"):
        con.execute(f"CREATE OR REPLACE TABLE {name} AS FROM read_parquet({lit(str(folder / f'{name}.parquet'))})")
    con.execute("CREATE OR REPLACE TABLE weights AS SELECT conversation_id, user_id, 1.0::DOUBLE AS weight "
                "FROM conversations")
    con.execute("CREATE OR REPLACE TABLE target_flags (turn_id VARCHAR, conversation_id VARCHAR, reason VARCHAR)")
    con.execute("CREATE OR REPLACE TABLE dropped (filter VARCHAR, id VARCHAR)")


def fetch_tables(con: duckdb.DuckDBPyConnection) -> dict[str, pa.Table]:
    """Every filtered table as Arrow (for comparing outputs; not part of the timed work)."""
    return {name: con.sql(f"FROM {name}").to_arrow_table() for name in TABLE_ORDER}


def _stable_hashes(con: duckdb.DuckDBPyConnection, name: str, query: str, salt: str) -> None:
    """Register `name` (id, h): the stable hash of each distinct id the query returns."""
    ids = con.sql(f"SELECT DISTINCT id FROM ({query})").to_arrow_table().column("id")
    table = pa.table({"id": ids, "h": pa.array(hash_strings(ids, salt), pa.uint64())})
    con.register(name, table)


# --- filters -----------------------------------------------------------------------------------


def drop_users(con: duckdb.DuckDBPyConnection, gone: str) -> None:
    """Everything of the users in table/view `gone` (column user_id)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE _gone_convs AS SELECT conversation_id FROM conversations "
                f"WHERE user_id IN (SELECT user_id FROM {gone})")
    for name in ("turns", "target_flags"):
        con.execute(f"DELETE FROM {name} WHERE conversation_id IN (FROM _gone_convs)")
    for name in ("users", "sessions", "conversations", "events", "labels", "weights"):
        con.execute(f"DELETE FROM {name} WHERE user_id IN (SELECT user_id FROM {gone})")


def drop_conversations(con: duckdb.DuckDBPyConnection, gone: str) -> None:
    """The conversations in table/view `gone` (column conversation_id), with their rows (sessions stay)."""
    for name in ("conversations", "turns", "events", "labels", "weights", "target_flags"):
        con.execute(f"DELETE FROM {name} WHERE conversation_id IN (SELECT conversation_id FROM {gone})")


def _record(con: duckdb.DuckDBPyConnection, flt: str, query: str) -> None:
    con.execute(f"INSERT INTO dropped SELECT {lit(flt)}, id FROM ({query})")


def _lexicon(words: list[str]) -> str:
    return r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"


def quality(con: duckdb.DuckDBPyConnection, c: QualityConfig) -> None:
    lexicon = sorted({w.lower() for w in c.unsafe_words if w.strip()})
    unsafe = f"len(regexp_extract_all(t.low, {lit(_lexicon(lexicon))}))" if lexicon else "0"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _targets AS
        SELECT turn_id, conversation_id, position, stripped, lower(stripped) AS low
        FROM (SELECT *, {strip('text')} AS stripped FROM turns WHERE role = 'assistant' AND selected)""")
    # A sentence said before: in the same answer (same position) or in the `history` answers before.
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _flagged AS
        WITH pieces AS MATERIALIZED (  -- not inlined: the filter below would strip every sentence twice
            SELECT turn_id, conversation_id, position,
                   {strip(f"unnest(regexp_split_to_array(low, {lit(SENTENCE_BREAK)}))", char_class(EDGE_CHARS))} AS s
            FROM _targets),
        said AS (  -- partitioned by a hash, as ours compares sentences (by the strings: 40% slower)
            SELECT turn_id, position,
                   lag(position) OVER (PARTITION BY hash(conversation_id, s) ORDER BY position) AS prev
            FROM pieces WHERE length(s) >= {c.min_sentence_chars}),
        per AS (
            SELECT turn_id, count(*) AS total, count_if(prev = position) AS dups,
                   count_if(prev < position AND prev >= position - {2 * c.history}) AS common
            FROM said GROUP BY turn_id),
        judged AS (
            SELECT t.turn_id, t.conversation_id,
                   CASE
                     WHEN length(t.stripped) < {c.min_chars} THEN 'empty'
                     WHEN {str(c.check_truncated).lower()} AND NOT regexp_matches(t.stripped, {lit(c.end_pattern)})
                       THEN 'truncated'
                     WHEN {unsafe} > {c.max_unsafe} THEN 'unsafe'
                     WHEN coalesce(p.dups / p.total, 0) > {c.max_repeat_within} THEN 'repetitive'
                     WHEN coalesce(p.common / nullif(p.total - p.dups, 0), 0) > {c.max_repeat_across}
                       THEN 'repeats_earlier_turn'
                   END AS reason
            FROM _targets t LEFT JOIN per p USING (turn_id))
        SELECT * FROM judged WHERE reason IS NOT NULL""")
    con.execute("INSERT INTO target_flags SELECT * FROM _flagged "
                "WHERE turn_id NOT IN (SELECT turn_id FROM target_flags)")
    _record(con, "quality", "SELECT turn_id AS id FROM _flagged")


def _read_stats(min_seconds: float, max_wps: float) -> str:
    """Per user: reads, and the share of them too short to be reading."""
    words = ("CASE WHEN t.text IS NULL OR t.text = '' THEN 0 "
             "ELSE strlen(t.text) - strlen(replace(t.text, ' ', '')) + 1 END")
    return f"""
        SELECT e.user_id, count(*) AS n_reads,
               avg(((e.value < {min_seconds}) OR ({words} > {max_wps} * e.value))::DOUBLE) AS unread_share
        FROM events e LEFT JOIN turns t USING (turn_id)
        WHERE e.type = 'read' GROUP BY e.user_id"""


def bots(con: duckdb.DuckDBPyConnection, c: BotConfig) -> None:
    signals = {
        "repeats": f"n_messages >= {c.min_messages} AND dup_share >= {c.max_duplicate_share}",
        "fast": f"n_replies >= {c.min_replies} AND median_reply < {c.min_median_reply_seconds}",
        "regular": f"n_replies >= {c.min_regular_replies} AND reply_cv < {c.max_reply_cv}",
        "no_read": f"n_reads >= {c.min_reads} AND unread_share >= {c.max_unread_share}",
    }
    fired = ", ".join(f"coalesce({cond}, false) AS {name}" for name, cond in signals.items())
    count = " + ".join(f"{name}::INT" for name in signals)
    strong = " OR ".join(c.need_one_of) if c.need_one_of else "true"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _bots AS
        WITH repeats AS (
            SELECT c.user_id, count(*) AS n_messages,
                   1.0 - count(DISTINCT lower({strip('t.text')})) / count(*) AS dup_share
            FROM turns t JOIN conversations c USING (conversation_id)
            WHERE t.role = 'user' GROUP BY c.user_id),
        gaps AS (
            SELECT user_id, type,
                   (epoch_ms(timestamp) - lag(epoch_ms(timestamp)) OVER (PARTITION BY conversation_id
                                                                        ORDER BY timestamp)) / 1000.0 AS gap
            FROM events),
        replies AS (
            SELECT user_id, count(*) AS n_replies, median(gap) AS median_reply, stddev_samp(gap) / avg(gap) AS reply_cv
            FROM gaps WHERE type = 'message' AND gap IS NOT NULL GROUP BY user_id),
        reads AS ({_read_stats(c.min_read_seconds, c.max_words_per_second)}),
        signals AS (
            SELECT u.user_id, coalesce(n_messages, 0) AS n_messages, dup_share,
                   coalesce(n_replies, 0) AS n_replies, median_reply, reply_cv,
                   coalesce(n_reads, 0) AS n_reads, unread_share
            FROM users u LEFT JOIN repeats USING (user_id) LEFT JOIN replies USING (user_id)
                 LEFT JOIN reads USING (user_id)),
        fired AS (SELECT user_id, {fired} FROM signals)
        SELECT user_id FROM fired WHERE {count} >= {c.min_signals} AND ({strong})""")
    _record(con, "bots", "SELECT user_id AS id FROM _bots")
    drop_users(con, "_bots")


def min_reading(con: duckdb.DuckDBPyConnection, c: MinReadingConfig) -> None:
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _skimmers AS
        SELECT user_id FROM ({_read_stats(c.min_read_seconds, c.max_words_per_second)})
        WHERE n_reads >= {c.min_reads} AND unread_share >= {c.max_unread_share}""")
    _record(con, "min_reading", "SELECT user_id AS id FROM _skimmers")
    types = ", ".join(lit(t) for t in c.drop_events) or "NULL"
    con.execute(f"DELETE FROM events WHERE user_id IN (FROM _skimmers) AND type IN ({types})")


def repeats(con: duckdb.DuckDBPyConnection, c: RepeatConfig) -> None:
    docs = con.sql(f"""
        WITH text AS (
            SELECT conversation_id, string_agg(text, chr(10) ORDER BY position, candidate_index) AS text
            FROM turns WHERE role = 'user' GROUP BY conversation_id),
        norm AS (
            SELECT c.conversation_id, c.started_at,
                   {strip(f"regexp_replace(lower(t.text), {lit(NON_WORD)}, ' ', 'g')")} AS norm
            FROM conversations c JOIN text t USING (conversation_id))
        SELECT conversation_id, norm FROM norm
        WHERE strlen(norm) - strlen(replace(norm, ' ', '')) + 1 >= {c.min_words}
        ORDER BY started_at, conversation_id""").to_arrow_table()
    if docs.num_rows == 0:
        return
    # The MinHash and LSH groups ours computes, on the same normalised texts (see the module docstring).
    frame = pl.from_arrow(docs).select("norm", doc=pl.int_range(pl.len(), dtype=pl.Int64))
    d, words, pairs = shingles(frame, text="norm", normalized=True)
    group = lsh_groups(minhash(d, words, pairs, docs.num_rows, c.num_perm, c.seed), c.rows, c.threshold)
    con.register("_groups", pa.table({"conversation_id": docs.column("conversation_id"), "grp": group}))
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _repeats AS
        SELECT conversation_id FROM (
            SELECT conversation_id, row_number() OVER (PARTITION BY grp ORDER BY started_at, conversation_id) AS n
            FROM _groups JOIN conversations USING (conversation_id))
        WHERE n > {c.max_copies}""")
    con.unregister("_groups")
    _record(con, "repeats", "SELECT conversation_id AS id FROM _repeats")
    drop_conversations(con, "_repeats")


def _topic_case(c: DiversityConfig) -> tuple[str, str]:
    """(per-conversation keyword counts per topic, the topic: most keywords, first on ties, else 'other')."""
    names = [t for t, ws in c.topics.items() if ws]
    counts = ", ".join(f"sum(len(regexp_extract_all(lower(text), {lit(_lexicon([w.lower() for w in c.topics[t]]))})))"
                       f" AS _t{i}" for i, t in enumerate(names))
    best = "greatest(" + ", ".join(f"_t{i}" for i in range(len(names))) + ")"
    whens = " ".join(f"WHEN _t{i} = {best} THEN {lit(t)}" for i, t in enumerate(names))
    return counts, f"CASE WHEN {best} = 0 THEN 'other' {whens} END"


def diversity(con: duckdb.DuckDBPyConnection, c: DiversityConfig) -> None:
    names = [t for t, ws in c.topics.items() if ws]
    if names:
        counts, topic = _topic_case(c)
        topics = (f"SELECT conversation_id, {topic} AS topic FROM (SELECT conversation_id, {counts} FROM turns "
                  f"WHERE role = 'user' GROUP BY conversation_id)")
    else:
        topics = "SELECT NULL::VARCHAR AS conversation_id, NULL::VARCHAR AS topic WHERE false"
    _stable_hashes(con, "_div_hash", "SELECT conversation_id AS id FROM conversations", c.salt)
    # Exact duplicates: same character, same selected path (role and text, case and edges aside),
    # compared by a hash of the path as ours does (partitioning by the lists themselves: 2.3x slower).
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _div AS
        WITH body AS (
            SELECT conversation_id, hash(list(hash(role, lower({strip('text')})) ORDER BY position, candidate_index))
                   AS body
            FROM turns WHERE selected GROUP BY conversation_id),
        topics AS ({topics})
        SELECT c.conversation_id, c.character_id, coalesce(t.topic, 'other') AS topic, h.h,
               row_number() OVER (PARTITION BY c.character_id, b.body ORDER BY c.started_at, c.conversation_id) AS copy,
               c.started_at
        FROM conversations c LEFT JOIN body b USING (conversation_id) LEFT JOIN topics t USING (conversation_id)
             JOIN _div_hash h ON h.id = c.conversation_id""")
    con.unregister("_div_hash")
    con.execute("CREATE OR REPLACE TEMP TABLE _div_gone (conversation_id VARCHAR)")
    if c.dedup:
        con.execute("INSERT INTO _div_gone SELECT conversation_id FROM _div WHERE copy > 1")
        con.execute("DELETE FROM _div WHERE copy > 1")
    caps = [(col, share) for col, share in (("character_id", c.max_character_share), ("topic", c.max_topic_share))
            if share is not None]
    for _ in range(5):  # cutting one kind can push the other back above its share
        changed = False
        for col, share in caps:
            counts = dict(con.execute(f"SELECT {col}, count(*) FROM _div GROUP BY {col}").fetchall())
            cut = share_caps(counts, share, ["other"] if col == "topic" and not c.cap_other else [])
            if not cut:
                continue
            con.register("_limits", pa.table({"g": list(cut), "cap": list(cut.values())}))
            con.execute(f"""
                CREATE OR REPLACE TEMP TABLE _over AS
                SELECT conversation_id FROM (
                    SELECT conversation_id, cap,
                           row_number() OVER (PARTITION BY {col} ORDER BY h, started_at, conversation_id) AS n
                    FROM _div JOIN _limits ON _limits.g = _div.{col})
                WHERE n > cap""")
            con.unregister("_limits")
            con.execute("INSERT INTO _div_gone FROM _over")
            con.execute("DELETE FROM _div WHERE conversation_id IN (FROM _over)")
            changed = True
        if not changed:
            break
    _record(con, "diversity", "SELECT conversation_id AS id FROM _div_gone")
    drop_conversations(con, "_div_gone")


def user_cap(con: duckdb.DuckDBPyConnection, c: UserCapConfig) -> None:
    _stable_hashes(con, "_cap_hash", "SELECT conversation_id AS id FROM conversations", c.salt)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _cap AS
        WITH ex AS (
            SELECT conversation_id, count(*) AS n FROM turns WHERE role = 'assistant' AND selected
            GROUP BY conversation_id),
        s AS (
            SELECT c.conversation_id, c.user_id, coalesce(ex.n, 0) AS n_examples, h.h
            FROM conversations c LEFT JOIN ex USING (conversation_id) JOIN _cap_hash h ON h.id = c.conversation_id)
        SELECT conversation_id,
               row_number() OVER w - 1 AS rank, sum(n_examples) OVER w AS cum,
               count(*) OVER (PARTITION BY user_id) AS n_convs, sum(n_examples) OVER (PARTITION BY user_id) AS n_ex
        FROM s WINDOW w AS (PARTITION BY user_id ORDER BY h ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)""")
    con.unregister("_cap_hash")
    if c.mode == "drop":
        over = " OR ".join([*([f"rank >= {c.max_conversations}"] if c.max_conversations else []),
                            *([f"cum > {c.max_examples}"] if c.max_examples else [])]) or "false"
        con.execute(f"CREATE OR REPLACE TEMP TABLE _capped AS SELECT conversation_id FROM _cap WHERE {over}")
        _record(con, "user_cap", "SELECT conversation_id AS id FROM _capped")
        drop_conversations(con, "_capped")
        return
    terms = [*([f"{c.max_conversations} / n_convs"] if c.max_conversations else []),
             *([f"{c.max_examples} / n_ex::DOUBLE"] if c.max_examples else [])]
    factor = f"least(1.0, {', '.join(terms)})" if terms else "1.0"
    con.execute(f"CREATE OR REPLACE TEMP TABLE _factor AS SELECT * FROM "
                f"(SELECT conversation_id, {factor} AS factor FROM _cap) WHERE factor < 1.0")
    _record(con, "user_cap", "SELECT conversation_id AS id FROM _factor")
    con.execute("UPDATE weights SET weight = weight * f.factor FROM _factor f "
                "WHERE weights.conversation_id = f.conversation_id")


FILTERS = {"quality": quality, "bots": bots, "min_reading": min_reading, "repeats": repeats,
           "diversity": diversity, "user_cap": user_cap}


def run_filters_duckdb(con: duckdb.DuckDBPyConnection, config: FilterConfig | None = None) -> None:
    """The enabled filters in order, on the tables `load_logs` made (changed in place)."""
    config = config or FilterConfig()
    for name in config.order:
        section = getattr(config, name)
        if section.enabled:
            FILTERS[name](con, section)


# --- dataset builders --------------------------------------------------------------------------


def _context(con: duckdb.DuckDBPyConnection, config: BuildConfig) -> None:
    """The messages every example is made of, each list built once and shared by the datasets:

    `_path`     every conversation's selected path (turn_id, role, content, idx), well-formed ones only
    `_convs`    per conversation with a path: user, character, weight, system message, path messages
    `_answers`  per assistant turn answering a turn on a path (that a dataset can use: shown,
                selected or voted on): its context, then the turn as written (sft, reward sets)
    `_prompts`  per user turn on a path: its context, ending with it (pairs' prompts, distill)
    """
    content = "coalesce(e.edit, t.text)" if config.use_edits else "t.text"
    edits = ("LEFT JOIN (SELECT turn_id, arg_max(text, timestamp) AS edit FROM events WHERE type = 'edit' "
             "GROUP BY turn_id) e USING (turn_id)") if config.use_edits else ""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _path AS
        WITH p AS (
            SELECT t.turn_id, t.conversation_id, t.role, {content} AS content,
                   row_number() OVER (PARTITION BY t.conversation_id ORDER BY t.position, t.candidate_index) - 1 AS idx
            FROM turns t {edits} WHERE t.selected),
        bad AS (
            SELECT DISTINCT conversation_id FROM p
            WHERE role <> CASE WHEN idx % 2 = 0 THEN 'user' ELSE 'assistant' END)
        SELECT * FROM p WHERE conversation_id NOT IN (FROM bad)""")
    system = "system_prompt <> ''" if config.include_system else "false"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _convs AS
        WITH msgs AS (
            SELECT conversation_id, list({{'role': role, 'content': content}} ORDER BY idx) AS msgs
            FROM _path GROUP BY conversation_id)
        SELECT c.conversation_id, c.user_id, c.character_id, coalesce(w.weight, 1.0) AS weight,
               CASE WHEN {system} THEN [{{'role': 'system', 'content': c.system_prompt}}] ELSE [] END AS sys,
               m.msgs
        FROM conversations c JOIN msgs m USING (conversation_id) LEFT JOIN weights w USING (conversation_id)""")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _answers AS
        SELECT a.turn_id, a.conversation_id, a.parent_id, c.user_id, c.character_id, c.weight,
               {_messages(config, "p.idx + 1", "[{'role': 'assistant', 'content': a.text}]")} AS messages
        FROM turns a JOIN _path p ON p.turn_id = a.parent_id JOIN _convs c ON c.conversation_id = a.conversation_id
        WHERE a.role = 'assistant' AND (a.shown OR a.selected OR a.turn_id IN (
            SELECT turn_id FROM events WHERE type = 'vote' AND turn_id IS NOT NULL))""")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _prompts AS
        SELECT p.turn_id, p.conversation_id, c.user_id, c.character_id, c.weight,
               {_messages(config, "p.idx + 1")} AS messages
        FROM _path p JOIN _convs c USING (conversation_id) WHERE p.role = 'user'""")


def _messages(config: BuildConfig, end: str, target: str | None = None) -> str:
    """System message (`c.sys`), then the path (`c.msgs`) up to index `end` (exclusive; at most
    `max_context_messages`, from a user message), then the `target` message."""
    k = config.max_context_messages
    start = "0" if k is None else f"greatest({end} - {k}, 0)"
    start = f"({start} + {start} % 2)"
    return " || ".join(["c.sys", f"list_slice(c.msgs, {start} + 1, {end})", *([target] if target else [])])


def _copy(con: duckdb.DuckDBPyConnection, query: str, path: Path, parquet: ParquetSettings) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return con.execute(f"COPY ({query}) TO {lit(str(path))} ({parquet.copy_options()})").fetchall()[0][0]


def build_datasets_duckdb(con: duckdb.DuckDBPyConnection, config: BuildConfig | None = None,
                          out_dir: str | Path = "datasets", parquet: ParquetSettings | None = None) -> dict[str, int]:
    """Every enabled dataset from the filtered tables, one Parquet file each; returns rows per file."""
    config = config or BuildConfig()
    parquet = parquet or ParquetSettings()
    if list(config.formats) != ["parquet"]:
        raise ValueError("the DuckDB peer writes Parquet only")
    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    _context(con, config)
    con.execute("CREATE OR REPLACE TEMP TABLE _selects AS SELECT DISTINCT turn_id FROM events "
                "WHERE type = 'select' AND turn_id IS NOT NULL")
    con.execute("CREATE OR REPLACE TEMP TABLE _chosen AS SELECT * FROM turns "
                "WHERE role = 'assistant' AND selected AND turn_id IN (FROM _selects)")
    if config.rm.enabled or config.rl.enabled:
        _user_split(con, config)

    if config.sft.enabled:
        source = config.sft.source
        if source == "auto":  # as ours decides: swipes when the logs have any select event
            selects = con.execute("SELECT count(*) FROM events WHERE type = 'select'").fetchone()[0]
            source = "swipes" if selects else "selected"
        pool = "_chosen" if source == "swipes" else \
            "(SELECT * FROM turns WHERE role = 'assistant' AND selected)"
        counts["sft"] = _copy(con, f"""
            SELECT 'sft:' || turn_id AS example_id, a.user_id, a.conversation_id, turn_id, a.character_id,
                   CASE WHEN turn_id IN (FROM _selects) THEN 'swipe' ELSE 'selected' END AS source,
                   a.messages, a.weight
            FROM _answers a SEMI JOIN {pool} r USING (turn_id)
            WHERE turn_id NOT IN (SELECT turn_id FROM target_flags)""", out_dir / "sft.parquet", parquet)

    if config.dpo.enabled or (config.rm.enabled and "preference" in config.rm.signals):
        _pairs(con, config, out_dir, parquet, counts)

    if config.rm.enabled:
        for signal in config.rm.signals:
            if signal != "preference":
                _scalar(con, signal, config, out_dir, parquet, counts)

    if config.distill.enabled:
        _distill(con, config, out_dir, parquet, counts)
    if config.rl.enabled:
        _rl(con, config, out_dir, parquet, counts)
    return counts


def _user_split(con: duckdb.DuckDBPyConnection, config: BuildConfig) -> None:
    """Register `_split` (user_id, eval): a stable hash of the user id, as ours splits."""
    ids = con.sql("SELECT DISTINCT user_id FROM _convs").to_arrow_table().column("user_id")
    is_eval = unit_interval(hash_strings(ids, config.rm.salt)) < config.rm.eval_fraction
    con.register("_split", pa.table({"user_id": ids, "eval": is_eval}))


def _split_copies(con: duckdb.DuckDBPyConnection, name: str, query: str, out_dir: Path, parquet: ParquetSettings,
                  counts: dict[str, int], user: str, jsonl: bool = False) -> None:
    """`name/train` and `name/eval`: the query's rows split by the user in column `user` (`_split`).
    `query` ends in a WHERE clause, which the split joins. `jsonl`: each split as newline-delimited
    JSON too (the RL prompts: ours writes them as JSONL whatever the formats, `dataset_writer.JSONL_ALWAYS`)."""
    for split, flag in (("train", "NOT"), ("eval", "")):
        rows = f"{query} AND {user} IN (SELECT user_id FROM _split WHERE {flag} eval)"
        counts[f"{name}/{split}"] = _copy(con, rows, out_dir / f"{name}/{split}.parquet", parquet)
        if jsonl:
            path = out_dir / f"{name}/{split}.jsonl"
            con.execute(f"COPY ({rows}) TO {lit(str(path))} (FORMAT json)")


def _pairs(con: duckdb.DuckDBPyConnection, config: BuildConfig, out_dir: Path, parquet: ParquetSettings,
           counts: dict[str, int]) -> None:
    """Chosen vs shown-but-not-selected siblings, texts differing, at most `max_pairs_per_prompt` each
    (lowest candidate index first): DPO (chosen not flagged) and the preference reward set."""
    swiped = " AND turn_id IN (SELECT turn_id FROM events WHERE type = 'swipe' AND turn_id IS NOT NULL)" \
        if config.dpo.require_swipe_event else ""
    cap = config.dpo.max_pairs_per_prompt
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _pairs AS
        SELECT * FROM (
            SELECT ch.parent_id, ch.turn_id AS chosen_turn_id, rj.turn_id AS rejected_turn_id,
                   [{{'role': 'assistant', 'content': ch.text}}] AS chosen,
                   [{{'role': 'assistant', 'content': rj.text}}] AS rejected,
                   row_number() OVER (PARTITION BY ch.turn_id ORDER BY rj.candidate_index) AS n
            FROM _chosen ch JOIN (SELECT * FROM turns WHERE role = 'assistant' AND shown AND NOT selected{swiped}) rj
                 ON rj.parent_id = ch.parent_id
            WHERE {strip('ch.text')} <> {strip('rj.text')})
        {f'WHERE n <= {cap}' if cap else ''}""")
    pairs = """
        SELECT 'pair:' || r.chosen_turn_id || '>' || r.rejected_turn_id AS example_id, p.user_id, p.conversation_id,
               r.parent_id, r.chosen_turn_id, r.rejected_turn_id, p.messages AS prompt, r.chosen, r.rejected, p.weight
        FROM _pairs r JOIN _prompts p ON p.turn_id = r.parent_id WHERE true"""
    if config.dpo.enabled:
        counts["dpo"] = _copy(con, pairs + " AND r.chosen_turn_id NOT IN (SELECT turn_id FROM target_flags)",
                              out_dir / "dpo.parquet", parquet)
    if config.rm.enabled and "preference" in config.rm.signals:
        _split_copies(con, "rm/preference", pairs, out_dir, parquet, counts, "p.user_id")


LABEL_COLUMNS = {"continue": "continued", "turns_after": "turns_after", "time_to_next": "time_to_next_user_message",
                 "returned_1d": "returned_1d", "returned_7d": "returned_7d"}


def _scalar(con: duckdb.DuckDBPyConnection, signal: str, config: BuildConfig, out_dir: Path, parquet: ParquetSettings,
            counts: dict[str, int]) -> None:
    """One reward-model signal: the assistant turn in context, its label, censored or not."""
    if signal == "thumbs":
        rows = """
            SELECT turn_id, label, false AS censored
            FROM (SELECT turn_id, arg_max(value, timestamp) AS label FROM events WHERE type = 'vote' GROUP BY turn_id)
            WHERE label <> 0"""
    elif signal == "safety":
        rows = """
            SELECT turn_id, CASE WHEN turn_id IN (SELECT turn_id FROM events WHERE type = 'report'
                                                  AND turn_id IS NOT NULL) THEN 1.0 ELSE 0.0 END AS label,
                   false AS censored
            FROM turns WHERE role = 'assistant' AND shown"""
        ratio = config.rm.safety_negatives_per_positive
        if ratio is not None:
            con.execute(f"CREATE OR REPLACE TEMP TABLE _safety AS {rows}")
            positives = con.execute("SELECT count(*) FROM _safety WHERE label > 0").fetchall()[0][0]
            _stable_hashes(con, "_neg_hash", "SELECT turn_id AS id FROM _safety WHERE label = 0", "safety")
            con.execute(f"""
                CREATE OR REPLACE TEMP TABLE _safety AS
                SELECT * FROM _safety WHERE label > 0
                UNION ALL
                SELECT s.* FROM _safety s
                JOIN (SELECT id FROM _neg_hash ORDER BY h LIMIT {math.ceil(ratio * positives)}) n
                     ON n.id = s.turn_id""")
            con.unregister("_neg_hash")
            rows = "FROM _safety"
    else:
        column = LABEL_COLUMNS[signal]
        censored, keep = ("label IS NULL", "") if signal == "time_to_next" else ("false", "WHERE label IS NOT NULL")
        rows = (f"SELECT turn_id, label, {censored} AS censored "
                f"FROM (SELECT turn_id, {column}::DOUBLE AS label FROM labels) {keep}")
    query = f"""
        SELECT '{signal}:' || turn_id AS example_id, a.user_id, a.conversation_id, turn_id, a.messages,
               r.label::DOUBLE AS label, r.censored, a.weight
        FROM ({rows}) r JOIN _answers a USING (turn_id) WHERE true"""
    _split_copies(con, f"rm/{signal}", query, out_dir, parquet, counts, "a.user_id")


def _distill(con: duckdb.DuckDBPyConnection, config: BuildConfig, out_dir: Path, parquet: ParquetSettings,
             counts: dict[str, int]) -> None:
    """Every user turn on a path with its context as a prompt; one per distinct messages (the
    smallest example id), at most `max_prompts` (by stable hash of the example id)."""
    rows = """SELECT 'distill:' || turn_id AS example_id, user_id, conversation_id, turn_id, character_id, messages,
                     weight FROM _prompts"""
    if config.distill.dedup:
        rows = f"SELECT * FROM ({rows}) QUALIFY row_number() OVER (PARTITION BY messages ORDER BY example_id) = 1"
    cap = config.distill.max_prompts
    if cap is not None:
        con.execute(f"CREATE OR REPLACE TEMP TABLE _distill AS {rows}")
        _stable_hashes(con, "_distill_hash", "SELECT example_id AS id FROM _distill", "distill")
        con.execute(f"CREATE OR REPLACE TEMP TABLE _distill AS SELECT d.* FROM _distill d "
                    f"JOIN (SELECT id FROM _distill_hash ORDER BY h LIMIT {cap}) k ON k.id = d.example_id")
        con.unregister("_distill_hash")
        rows = "FROM _distill"
    counts["distill"] = _copy(con, rows, out_dir / "distill.parquet", parquet)


def _rl(con: duckdb.DuckDBPyConnection, config: BuildConfig, out_dir: Path, parquet: ParquetSettings,
        counts: dict[str, int]) -> None:
    """RL prompts: every user turn on a path with its context (`rl.max_context_messages`, else the
    build's), one per distinct messages over both splits (the smallest example id), split by user as
    the reward sets are, at most `max_prompts` per split (by stable hash of the example id)."""
    window = config.rl.max_context_messages
    shaped = config if window is None else config.model_copy(update={"max_context_messages": window})
    rows = f"""SELECT 'rl:' || p.turn_id AS example_id, c.user_id, p.conversation_id, p.turn_id, c.character_id,
                      {_messages(shaped, "p.idx + 1")} AS messages, c.weight
               FROM _path p JOIN _convs c USING (conversation_id) WHERE p.role = 'user'"""
    if config.rl.dedup:
        rows = f"SELECT * FROM ({rows}) QUALIFY row_number() OVER (PARTITION BY messages ORDER BY example_id) = 1"
    con.execute(f"CREATE OR REPLACE TEMP TABLE _rl AS {rows}")
    cap = config.rl.max_prompts
    if cap is not None:
        _stable_hashes(con, "_rl_hash", "SELECT example_id AS id FROM _rl", "rl")
        con.execute(f"""CREATE OR REPLACE TEMP TABLE _rl AS SELECT r.* FROM _rl r
                        JOIN _rl_hash k ON k.id = r.example_id JOIN _split s USING (user_id)
                        QUALIFY row_number() OVER (PARTITION BY s.eval ORDER BY k.h) <= {cap}""")
        con.unregister("_rl_hash")
    _split_copies(con, "rl", "SELECT example_id, user_id, conversation_id, turn_id, character_id, messages, weight "
                             "FROM _rl WHERE true", out_dir, parquet, counts, "user_id", jsonl=True)


__all__ = ["ParquetSettings", "build_datasets_duckdb", "connect", "fetch_tables", "load_logs", "run_filters_duckdb"]
