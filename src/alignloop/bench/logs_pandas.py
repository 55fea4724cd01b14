"""The peer of `alignloop bench logs`: the log filters and dataset builders written plainly in pandas.

The same stages as `alignloop.data.filters` and `alignloop.data.builders` with their default
configuration knobs honoured, written the way a data scientist would write them in a notebook:
merges, group-bys, string methods, and Python list comprehensions where a row needs a list (the
messages of an example). Everything runs on the whole log at once (no partitions).

Shared with ours on purpose, because they *define* which rows come out rather than how fast:
the stable string hash (`alignloop.data.stablehash`: train/eval split by user, which
conversations a cap keeps), the MinHash / LSH routines of `alignloop.data.neardup` and the word
hash they start from (Polars' seeded hash, called on the words pandas found), and the share-cap
rule `filters.share_caps` (plain arithmetic on a dict of counts). Any other choice there would
drop different conversations, and the outputs could not be compared.

Outputs: `run_filters_pandas` returns the filtered tables (pandas frames with the same rows as
`filters.run_filters`); `build_datasets_pandas` writes `<name>.parquet` for every dataset as
`builders.build_datasets` does (rows in any order; the benchmark compares them sorted).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

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
from alignloop.data.neardup import lsh_groups, minhash
from alignloop.data.stablehash import hash_strings, mix64, unit_interval

Tables = dict[str, pd.DataFrame]
_MUL = np.uint64(0x9E3779B97F4A7C15)  # neardup's word-pair constant: the same shingles as ours


def to_pandas(tables: dict[str, Any]) -> Tables:
    """Arrow tables (or Polars frames) as pandas frames."""
    return {name: t.to_pandas() for name, t in tables.items()}


# --- filters -----------------------------------------------------------------------------------


def drop_users(t: Tables, users: pd.Series) -> Tables:
    users = set(users)
    if not users:
        return t
    gone_convs = set(t["conversations"].loc[t["conversations"]["user_id"].isin(users), "conversation_id"])
    out = dict(t)
    for name in ("users", "sessions", "conversations", "events", "labels", "weights"):
        out[name] = t[name][~t[name]["user_id"].isin(users)]
    for name in ("turns", "target_flags"):
        out[name] = t[name][~t[name]["conversation_id"].isin(gone_convs)]
    return out


def drop_conversations(t: Tables, convs: pd.Series) -> Tables:
    convs = set(convs)
    if not convs:
        return t
    out = dict(t)
    for name in ("conversations", "turns", "events", "labels", "weights", "target_flags"):
        out[name] = t[name][~t[name]["conversation_id"].isin(convs)]
    return out


def word_count(text: pd.Series) -> pd.Series:
    """Words of single-spaced text: spaces + 1 (0 when empty)."""
    return np.where(text.str.len() > 0, text.str.count(" ") + 1, 0)


def quality(t: Tables, c: QualityConfig) -> Tables:
    turns = t["turns"]
    a = turns[(turns["role"] == "assistant") & turns["selected"]][["turn_id", "conversation_id", "position", "text"]]
    a = a.copy()
    a["stripped"] = a["text"].str.strip()
    a["lower"] = a["stripped"].str.lower()
    empty = a["stripped"].str.len() < c.min_chars
    ends_well = a["stripped"].str.contains(c.end_pattern, regex=True)
    lexicon = sorted({w.lower() for w in c.unsafe_words if w.strip()})
    if lexicon:
        n_unsafe = a["lower"].str.count(r"\b(?:" + "|".join(re.escape(w) for w in lexicon) + r")\b")
    else:
        n_unsafe = pd.Series(0, index=a.index)

    # Sentences of each answer, and whether each was said before: in the same answer (a copy) or
    # in one of the `history` selected answers before it.
    s = a[["turn_id", "conversation_id", "position"]].copy()
    s["sentence"] = a["lower"].str.replace(SENTENCE_BREAK, "\x00", regex=True).str.split("\x00")
    s = s.explode("sentence")
    s["sentence"] = s["sentence"].astype("str").str.strip(EDGE_CHARS)
    s = s[s["sentence"].str.len() >= c.min_sentence_chars]
    s = s.sort_values(["conversation_id", "sentence", "position"], kind="stable")
    prev = s.groupby(["conversation_id", "sentence"])["position"].shift()
    s["copy"] = prev == s["position"]
    s["said"] = (prev < s["position"]) & (prev >= s["position"] - 2 * c.history)
    per = s.groupby("turn_id").agg(total=("sentence", "size"), dups=("copy", "sum"), common=("said", "sum"))
    per = per.reindex(a["turn_id"]).fillna(0)
    total, dups, common = per["total"].to_numpy(), per["dups"].to_numpy(), per["common"].to_numpy()
    distinct = total - dups
    within = np.divide(dups, total, out=np.zeros(len(a)), where=total > 0)
    across = np.divide(common, distinct, out=np.zeros(len(a)), where=distinct > 0)

    reason = np.select(
        [empty.to_numpy(), (~ends_well.to_numpy()) & c.check_truncated, n_unsafe.to_numpy() > c.max_unsafe,
         within > c.max_repeat_within, across > c.max_repeat_across],
        ["empty", "truncated", "unsafe", "repetitive", "repeats_earlier_turn"], default="")
    flagged = a[["turn_id", "conversation_id"]].assign(reason=reason)
    flagged = flagged[flagged["reason"] != ""]
    flags = pd.concat([t["target_flags"], flagged], ignore_index=True).drop_duplicates("turn_id", keep="first")
    return {**t, "target_flags": flags}


def read_stats(t: Tables, min_seconds: float, max_wps: float) -> pd.DataFrame:
    ev = t["events"]
    reads = ev[ev["type"] == "read"][["user_id", "turn_id", "value"]]
    reads = reads.merge(t["turns"][["turn_id", "text"]], on="turn_id", how="left")
    n_words = pd.Series(word_count(reads["text"].fillna("")), index=reads.index)
    reads = reads.assign(unread=(reads["value"] < min_seconds) | (n_words > max_wps * reads["value"]))
    return reads.groupby("user_id").agg(n_reads=("unread", "size"), unread_share=("unread", "mean")).reset_index()


def bots(t: Tables, c: BotConfig) -> Tables:
    convs = t["conversations"][["conversation_id", "user_id"]]
    turns = t["turns"]
    msgs = turns[turns["role"] == "user"].merge(convs, on="conversation_id")
    msgs["norm"] = msgs["text"].str.lower().str.strip()
    repeats = msgs.groupby("user_id").agg(n_messages=("norm", "size"), distinct=("norm", "nunique")).reset_index()
    repeats["dup_share"] = 1.0 - repeats["distinct"] / repeats["n_messages"]

    ev = t["events"][["user_id", "type", "conversation_id", "timestamp"]].copy()
    ev["ms"] = ev["timestamp"].dt.as_unit("ms").astype("int64")
    ev = ev.sort_values(["conversation_id", "ms"], kind="stable")
    ev["gap"] = ev.groupby("conversation_id")["ms"].diff() / 1000.0
    replies = ev[(ev["type"] == "message") & ev["gap"].notna()]
    gaps = replies.groupby("user_id")["gap"].agg(["size", "median", "mean", "std"]).reset_index()
    gaps = gaps.rename(columns={"size": "n_replies", "median": "median_reply"})
    gaps["reply_cv"] = gaps["std"] / gaps["mean"]

    reads = read_stats(t, c.min_read_seconds, c.max_words_per_second)
    u = (t["users"][["user_id"]].merge(repeats, on="user_id", how="left").merge(gaps, on="user_id", how="left")
         .merge(reads, on="user_id", how="left"))
    for col in ("n_messages", "n_replies", "n_reads"):
        u[col] = u[col].fillna(0)
    signals = {
        "repeats": (u["n_messages"] >= c.min_messages) & (u["dup_share"] >= c.max_duplicate_share),
        "fast": (u["n_replies"] >= c.min_replies) & (u["median_reply"] < c.min_median_reply_seconds),
        "regular": (u["n_replies"] >= c.min_regular_replies) & (u["reply_cv"] < c.max_reply_cv),
        "no_read": (u["n_reads"] >= c.min_reads) & (u["unread_share"] >= c.max_unread_share),
    }
    fired = pd.DataFrame({k: v.fillna(False).astype(bool) for k, v in signals.items()})
    count = fired.sum(axis=1)
    strong = fired[c.need_one_of].any(axis=1) if c.need_one_of else True
    is_bot = (count >= c.min_signals) & strong
    return drop_users(t, u.loc[is_bot, "user_id"])


def min_reading(t: Tables, c: MinReadingConfig) -> Tables:
    stats = read_stats(t, c.min_read_seconds, c.max_words_per_second)
    skimmers = set(stats.loc[(stats["n_reads"] >= c.min_reads) & (stats["unread_share"] >= c.max_unread_share),
                             "user_id"])
    ev = t["events"]
    drop = ev["user_id"].isin(skimmers) & ev["type"].isin(c.drop_events)
    return {**t, "events": ev[~drop]}


def normalize(text: pd.Series) -> pd.Series:
    return text.str.lower().str.replace(r"[^\p{L}\p{N}]+", " ", regex=True).str.strip()


def repeats(t: Tables, c: RepeatConfig) -> Tables:
    convs = t["conversations"][["conversation_id", "user_id", "started_at"]]
    turns = t["turns"]
    user_turns = turns[turns["role"] == "user"].sort_values(["conversation_id", "position", "candidate_index"])
    text = user_turns.groupby("conversation_id", sort=False)["text"].agg("\n".join).rename("text").reset_index()
    docs = convs.merge(text, on="conversation_id")
    docs["norm"] = normalize(docs["text"])
    docs["n_words"] = docs["norm"].str.count(" ") + 1
    docs = docs[docs["n_words"] >= c.min_words].sort_values(["started_at", "conversation_id"]).reset_index(drop=True)
    if docs.empty:
        return t
    # MinHash of each conversation's words and word pairs, then banded LSH (shared with ours).
    words = docs["norm"].str.split(" ").explode()
    words = words[words.notna() & (words != "")]
    d = words.index.to_numpy().astype(np.int64)
    h = pl.Series(words.to_numpy(), dtype=pl.String).hash(seed=17).to_numpy()
    nxt = np.r_[h[1:], h[-1:]]
    last = np.r_[d[1:] != d[:-1], True]
    with np.errstate(over="ignore"):
        pairs = np.where(last, h, mix64(h * _MUL + nxt + np.uint64(1)))
    sig = minhash(d, h, pairs, len(docs), c.num_perm, c.seed)
    docs["group"] = lsh_groups(sig, c.rows, c.threshold, (docs["n_words"] >= c.min_words).to_numpy())
    docs["rank"] = docs.groupby("group").cumcount()
    return drop_conversations(t, docs.loc[docs["rank"] >= c.max_copies, "conversation_id"])


TOPIC_OTHER = "other"


def topics(t: Tables, c: DiversityConfig) -> pd.Series:
    names = [name for name, ws in c.topics.items() if ws]
    turns = t["turns"]
    user = turns[turns["role"] == "user"]
    if not names:
        return pd.Series(dtype="str")
    lower = user["text"].str.lower()
    counts = pd.DataFrame({name: lower.str.count(r"\b(?:" + "|".join(re.escape(w.lower()) for w in c.topics[name])
                                                 + r")\b") for name in names})
    counts["conversation_id"] = user["conversation_id"].to_numpy()
    per = counts.groupby("conversation_id").sum()
    best = per.idxmax(axis=1).where(per.max(axis=1) > 0, TOPIC_OTHER)
    return best.rename("topic")


def diversity(t: Tables, c: DiversityConfig) -> Tables:
    convs = t["conversations"][["conversation_id", "user_id", "character_id", "started_at"]]
    turns = t["turns"]
    path = turns[turns["selected"]].sort_values(["conversation_id", "position", "candidate_index"])
    item = path["role"] + "\x1f" + path["text"].str.lower().str.strip()
    body = item.groupby(path["conversation_id"], sort=False).agg("\x1e".join).rename("body").reset_index()
    s = convs.merge(body, on="conversation_id", how="left")
    s["body"] = s["body"].fillna("")
    s = s.merge(topics(t, c).reset_index(), on="conversation_id", how="left")
    s["topic"] = s["topic"].fillna(TOPIC_OTHER)
    s["h"] = hash_strings(s["conversation_id"].to_numpy(), c.salt)
    s = s.sort_values(["started_at", "conversation_id"])
    dropped = []
    if c.dedup:
        dup = s.groupby(["character_id", "body"]).cumcount() > 0
        dropped.append(s.loc[dup, "conversation_id"])
        s = s[~dup]
    caps = [(col, share) for col, share in (("character_id", c.max_character_share), ("topic", c.max_topic_share))
            if share is not None]
    for _ in range(5):
        changed = False
        for col, share in caps:
            counts = s[col].value_counts().to_dict()
            exempt = [TOPIC_OTHER] if col == "topic" and not c.cap_other else []
            cut = share_caps(counts, share, exempt)
            if not cut:
                continue
            capped = s[s[col].isin(list(cut))].sort_values([col, "h"])
            rank = capped.groupby(col).cumcount() + 1
            over = capped.loc[rank > capped[col].map(cut), "conversation_id"]
            dropped.append(over)
            s = s[~s["conversation_id"].isin(set(over))]
            changed = True
        if not changed:
            break
    return drop_conversations(t, pd.concat(dropped) if dropped else pd.Series(dtype="str"))


def user_cap(t: Tables, c: UserCapConfig) -> Tables:
    turns = t["turns"]
    examples = turns[(turns["role"] == "assistant") & turns["selected"]].groupby("conversation_id").size()
    convs = t["conversations"][["conversation_id", "user_id"]].copy()
    convs["n_examples"] = convs["conversation_id"].map(examples).fillna(0).astype("int64")
    convs["h"] = hash_strings(convs["conversation_id"].to_numpy(), c.salt)
    convs = convs.sort_values(["user_id", "h"])
    by_user = convs.groupby("user_id")
    convs["rank"] = by_user.cumcount()
    convs["cum"] = by_user["n_examples"].cumsum()
    if c.mode == "drop":
        over = pd.Series(False, index=convs.index)
        if c.max_conversations:
            over |= convs["rank"] >= c.max_conversations
        if c.max_examples:
            over |= convs["cum"] > c.max_examples
        return drop_conversations(t, convs.loc[over, "conversation_id"])
    weight = pd.Series(1.0, index=convs.index)
    if c.max_conversations:
        weight = np.minimum(weight, c.max_conversations / by_user["conversation_id"].transform("size"))
    if c.max_examples:
        weight = np.minimum(weight, c.max_examples / by_user["n_examples"].transform("sum").astype(float))
    factor = pd.Series(weight.to_numpy(), index=convs["conversation_id"].to_numpy())
    factor = factor[factor < 1.0]
    weights = t["weights"].copy()
    weights["weight"] = weights["weight"] * weights["conversation_id"].map(factor).fillna(1.0)
    return {**t, "weights": weights}


FILTERS = {"quality": quality, "bots": bots, "min_reading": min_reading, "repeats": repeats,
           "diversity": diversity, "user_cap": user_cap}


def run_filters_pandas(tables: Tables, config: FilterConfig | None = None) -> Tables:
    """The enabled filters in order, on the whole log. `tables`: the five log tables and labels."""
    config = config or FilterConfig()
    t = dict(tables)
    t["weights"] = t["conversations"][["conversation_id", "user_id"]].assign(weight=1.0)
    t["target_flags"] = pd.DataFrame({"turn_id": pd.Series(dtype="str"), "conversation_id": pd.Series(dtype="str"),
                                      "reason": pd.Series(dtype="str")})
    for name in config.order:
        section = getattr(config, name)
        if section.enabled:
            t = FILTERS[name](t, section)
    return t


# --- dataset builders --------------------------------------------------------------------------


class Context:
    """Every conversation's selected path as a list of messages, and what examples need besides."""

    def __init__(self, t: Tables, config: BuildConfig):
        self.config = config
        turns, events = t["turns"], t["events"]
        path = turns[turns["selected"]].sort_values(["conversation_id", "position", "candidate_index"])
        path = path[["turn_id", "conversation_id", "role", "text"]].copy()
        if config.use_edits:
            edits = events[events["type"] == "edit"].sort_values("timestamp", kind="stable")
            edits = edits.drop_duplicates("turn_id", keep="last").set_index("turn_id")["text"]
            path["content"] = path["turn_id"].map(edits).fillna(path["text"])
        else:
            path["content"] = path["text"]
        path["idx"] = path.groupby("conversation_id").cumcount()
        expected = np.where(path["idx"] % 2 == 0, "user", "assistant")
        bad = set(path.loc[path["role"] != expected, "conversation_id"])
        self.malformed = len(bad)
        path = path[~path["conversation_id"].isin(bad)]
        self.index = path[["turn_id", "conversation_id", "idx"]]
        lists = path.groupby("conversation_id", sort=False)[["role", "content"]].agg(list)
        self.messages = {cid: [{"role": r, "content": m} for r, m in zip(roles, contents)]
                         for cid, roles, contents in zip(lists.index, lists["role"], lists["content"])}
        convs = t["conversations"][t["conversations"]["conversation_id"].isin(self.messages)]
        convs = convs.merge(t["weights"][["conversation_id", "weight"]], on="conversation_id", how="left")
        convs["weight"] = convs["weight"].fillna(1.0)
        convs["system"] = [({"role": "system", "content": p} if p != "" and config.include_system else None)
                           for p in convs["system_prompt"]]
        self.convs = convs[["conversation_id", "user_id", "character_id", "weight", "system"]]
        assistant = turns[turns["role"] == "assistant"]
        self.original = dict(zip(assistant["turn_id"], assistant["text"]))

    def at_parent(self, df: pd.DataFrame) -> pd.DataFrame:
        parent = self.index.rename(columns={"turn_id": "parent_id"})[["parent_id", "idx"]]
        return df.merge(parent.assign(end=parent["idx"] + 1).drop(columns="idx"), on="parent_id")

    def attach(self, df: pd.DataFrame, target: str | None = None, name: str = "messages") -> pd.DataFrame:
        rows = df.merge(self.convs, on="conversation_id")
        if target is not None:
            rows = rows[rows[target].isin(self.original)]
        k = self.config.max_context_messages
        out = []
        targets = rows[target] if target is not None else [None] * len(rows)
        for cid, end, system, tid in zip(rows["conversation_id"], rows["end"], rows["system"], targets):
            start = 0 if k is None else max(end - k, 0)
            start += start % 2  # begin at a user message
            messages = ([system] if system is not None else []) + self.messages[cid][start:end]
            if tid is not None:
                messages.append({"role": "assistant", "content": self.original[tid]})
            out.append(messages)
        rows = rows.drop(columns="system")
        rows[name] = out
        return rows

    def one(self, df: pd.DataFrame, turn: str, name: str) -> pd.DataFrame:
        df = df[df[turn].isin(self.original)].copy()
        df[name] = [[{"role": "assistant", "content": self.original[tid]}] for tid in df[turn]]
        return df


def split_of(user_ids: pd.Series, eval_fraction: float, salt: str) -> np.ndarray:
    return np.where(unit_interval(hash_strings(user_ids.to_numpy(), salt)) < eval_fraction, "eval", "train")


def _write(out_dir: Path, name: str, df: pd.DataFrame, columns: list[str], counts: dict[str, int]) -> None:
    path = out_dir / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    df[columns].to_parquet(path, index=False)
    counts[name] = len(df)


SFT_COLUMNS = ["example_id", "user_id", "conversation_id", "turn_id", "character_id", "source", "messages", "weight"]
PAIR_COLUMNS = ["example_id", "user_id", "conversation_id", "parent_id", "chosen_turn_id", "rejected_turn_id",
                "prompt", "chosen", "rejected", "weight"]
SCALAR_COLUMNS = ["example_id", "user_id", "conversation_id", "turn_id", "messages", "label", "censored", "weight"]
DISTILL_COLUMNS = ["example_id", "user_id", "conversation_id", "turn_id", "character_id", "messages", "weight"]


def build_datasets_pandas(t: Tables, config: BuildConfig | None = None, out_dir: str | Path = "datasets"
                          ) -> dict[str, int]:
    """Every enabled dataset from filtered tables, one Parquet file each; returns rows per file.

    Each dataset's rows are built inside the call that writes them, so they are freed before the
    next dataset is built (the memory bench compares peaks).
    """
    config = config or BuildConfig()
    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    ctx = Context(t, config)
    turns, events = t["turns"], t["events"]
    flagged = set(t["target_flags"]["turn_id"])
    assistant = turns[turns["role"] == "assistant"][
        ["turn_id", "conversation_id", "parent_id", "candidate_index", "shown", "selected", "text"]]
    selects = set(events.loc[events["type"] == "select", "turn_id"].dropna())
    chosen = assistant[assistant["selected"] & assistant["turn_id"].isin(selects)]

    if config.sft.enabled:
        _write(out_dir, "sft", _sft_rows(ctx, config, assistant, chosen, selects, flagged), SFT_COLUMNS, counts)
    if config.dpo.enabled or (config.rm.enabled and "preference" in config.rm.signals):
        _write_pairs(out_dir, _pair_rows(ctx, config, events, assistant, chosen), config, flagged, counts)
    if config.rm.enabled:
        for signal in config.rm.signals:
            if signal != "preference":
                _write_split(out_dir, f"rm/{signal}", _scalar_rows(ctx, config, signal, t, assistant),
                             SCALAR_COLUMNS, config, counts)
    if config.distill.enabled:
        _write(out_dir, "distill", _distill_rows(ctx, config, turns), DISTILL_COLUMNS, counts)
    return counts


def _write_split(out_dir: Path, name: str, rows: pd.DataFrame, columns: list[str], config: BuildConfig,
                 counts: dict[str, int]) -> None:
    """`rows` split by user into `name`/train and `name`/eval (the reward models' held-out users)."""
    split = split_of(rows["user_id"], config.rm.eval_fraction, config.rm.salt)
    for side in ("train", "eval"):
        _write(out_dir, f"{name}/{side}", rows[split == side], columns, counts)


def _sft_rows(ctx: Context, config: BuildConfig, assistant: pd.DataFrame, chosen: pd.DataFrame, selects: set,
              flagged: set) -> pd.DataFrame:
    pool = chosen if config.sft.source == "swipes" else assistant[assistant["selected"]]
    kept = pool[~pool["turn_id"].isin(flagged)]
    rows = ctx.attach(ctx.at_parent(kept), target="turn_id")
    rows["example_id"] = "sft:" + rows["turn_id"]
    rows["source"] = np.where(rows["turn_id"].isin(selects), "swipe", "selected")
    return rows


def _pair_rows(ctx: Context, config: BuildConfig, events: pd.DataFrame, assistant: pd.DataFrame,
               chosen: pd.DataFrame) -> pd.DataFrame:
    """Chosen vs shown-but-not-selected siblings, texts differing, at most `max_pairs_per_prompt` each."""
    rejected = assistant[assistant["shown"] & ~assistant["selected"]]
    if config.dpo.require_swipe_event:
        swipes = set(events.loc[events["type"] == "swipe", "turn_id"].dropna())
        rejected = rejected[rejected["turn_id"].isin(swipes)]
    pairs = chosen[["parent_id", "conversation_id", "turn_id", "text"]].rename(
        columns={"turn_id": "chosen_turn_id", "text": "chosen_text"}).merge(
        rejected[["parent_id", "candidate_index", "turn_id", "text"]].rename(
            columns={"turn_id": "rejected_turn_id", "text": "rejected_text"}), on="parent_id")
    pairs = pairs[pairs["chosen_text"].str.strip() != pairs["rejected_text"].str.strip()]
    pairs = pairs.sort_values(["chosen_turn_id", "candidate_index"])
    if config.dpo.max_pairs_per_prompt:
        pairs = pairs[pairs.groupby("chosen_turn_id").cumcount() < config.dpo.max_pairs_per_prompt]
    pairs = ctx.attach(ctx.at_parent(pairs), name="prompt")
    pairs = ctx.one(ctx.one(pairs, "chosen_turn_id", "chosen"), "rejected_turn_id", "rejected")
    pairs["example_id"] = "pair:" + pairs["chosen_turn_id"] + ">" + pairs["rejected_turn_id"]
    return pairs


def _write_pairs(out_dir: Path, pairs: pd.DataFrame, config: BuildConfig, flagged: set, counts: dict[str, int]
                 ) -> None:
    if config.dpo.enabled:
        _write(out_dir, "dpo", pairs[~pairs["chosen_turn_id"].isin(flagged)], PAIR_COLUMNS, counts)
    if config.rm.enabled and "preference" in config.rm.signals:
        _write_split(out_dir, "rm/preference", pairs, PAIR_COLUMNS, config, counts)


LABEL_COLUMNS = {"continue": "continued", "turns_after": "turns_after", "time_to_next": "time_to_next_user_message",
                 "returned_1d": "returned_1d", "returned_7d": "returned_7d"}


def _scalar_rows(ctx: Context, config: BuildConfig, signal: str, t: Tables, assistant: pd.DataFrame
                 ) -> pd.DataFrame:
    """One reward-model signal's examples: the assistant turn in context, its label, censored or not."""
    if signal == "thumbs":
        rows = _thumbs(t["events"], assistant)
    elif signal == "safety":
        rows = _safety(t["events"], assistant, config.rm.safety_negatives_per_positive)
    else:
        lab = t["labels"][["turn_id", LABEL_COLUMNS[signal]]].rename(columns={LABEL_COLUMNS[signal]: "label"})
        rows = assistant.merge(lab, on="turn_id")
        rows["label"] = rows["label"].astype(float)
        if signal == "time_to_next":
            rows["censored"] = rows["label"].isna()
        else:
            rows = rows[rows["label"].notna()].assign(censored=False)
    rows = ctx.attach(ctx.at_parent(rows[["turn_id", "conversation_id", "parent_id", "label", "censored"]]),
                      target="turn_id")
    rows["example_id"] = f"{signal}:" + rows["turn_id"]
    return rows


def _thumbs(events: pd.DataFrame, assistant: pd.DataFrame) -> pd.DataFrame:
    """Each turn's last non-zero vote as its label."""
    votes = events[events["type"] == "vote"].sort_values("timestamp", kind="stable")
    votes = votes.drop_duplicates("turn_id", keep="last")[["turn_id", "value"]]
    votes = votes[votes["value"] != 0].rename(columns={"value": "label"})
    return assistant.merge(votes, on="turn_id").assign(censored=False)


def _safety(events: pd.DataFrame, assistant: pd.DataFrame, ratio: float | None) -> pd.DataFrame:
    """Shown turns labelled 1 if reported; with `ratio`, negatives cut to ratio x positives by hash."""
    reported = set(events.loc[events["type"] == "report", "turn_id"].dropna())
    rows = assistant[assistant["shown"]].copy()
    rows["label"] = rows["turn_id"].isin(reported).astype(float)
    rows["censored"] = False
    if ratio is None:
        return rows
    pos, neg = rows[rows["label"] > 0], rows[rows["label"] == 0].copy()
    neg["_h"] = hash_strings(neg["turn_id"].to_numpy(), "safety")
    neg = neg.sort_values("_h").head(math.ceil(ratio * len(pos))).drop(columns="_h")
    return pd.concat([pos, neg])


def _distill_rows(ctx: Context, config: BuildConfig, turns: pd.DataFrame) -> pd.DataFrame:
    """Every selected user turn with its context as a prompt; optionally deduplicated and capped."""
    users = turns[(turns["role"] == "user") & turns["selected"]][["turn_id", "conversation_id"]]
    rows = users.merge(ctx.index, on=["turn_id", "conversation_id"])
    rows["end"] = rows["idx"] + 1
    rows = ctx.attach(rows)
    rows["example_id"] = "distill:" + rows["turn_id"]
    rows = rows.sort_values("example_id")
    if config.distill.dedup:  # one prompt per distinct messages: the smallest example id
        key = [tuple((m["role"], m["content"]) for m in ms) for ms in rows["messages"]]
        rows = rows[~pd.Series(key, index=rows.index).duplicated()]
    if config.distill.max_prompts is not None and len(rows) > config.distill.max_prompts:
        rows = rows.assign(_h=hash_strings(rows["example_id"].to_numpy(), "distill"))
        rows = rows.sort_values("_h").head(config.distill.max_prompts)
    return rows


__all__ = ["build_datasets_pandas", "run_filters_pandas", "to_pandas"]
