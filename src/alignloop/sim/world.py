"""The simulated product: users visit over days, chat with characters, swipe, vote, read, leave, return.

`simulate(config)` returns `(logs, ground_truth)`: the five log tables of `alignloop.data.schema`
and the tables of `alignloop.sim.truth`. `simulate_blocks` yields the same in blocks of users, for
worlds too big for memory. Same config, same tables: every random draw comes from one generator
per block of users, seeded by (seed, block number).

Days: on each day a user gets a Poisson number of sessions (rate: their activity, scaled up or down
by how satisfied their recent sessions left them). Every running session is a *lane*; a step
advances every lane by one exchange, vectorised over lanes (numpy):

1. a lane without a conversation starts one with a character the user likes;
2. the user writes a message; the model answers (candidate 0, shown after a latency);
3. the user reads it and may swipe: the product then prefetches `candidates - 1` more, the user
   browses them one by one (swiping on with the swipe probability of each) and settles on one
   of those seen (softmax over engagement; at random for bots and skimmers);
4. a thumb, a safety report, an edit, maybe; then the user replies (continue probability) after
   thinking and typing, or leaves the conversation: then another conversation or the session ends.

When the last session of a user's day ends, their satisfaction is updated and their next day with
visits is planned at once, so lanes of different users' days run side by side.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime, time, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from alignloop.data.schema import EVENT_TYPES, TIMESTAMP, conform
from alignloop.runs import config_hash
from alignloop.sim import engagement as eg
from alignloop.sim.config import SimConfig
from alignloop.sim.lexicon import PIECES, TOPIC_NAMES, TOPICS, UNSAFE
from alignloop.sim.messages import bot_scripts, content_ids, uniform_ints, write_messages
from alignloop.sim.responder import WIDTH, Context, Responder, Responses, make_responder
from alignloop.sim.traits import (
    BOT,
    CHARACTERS,
    KINDS,
    NORMAL,
    SKIMMER,
    Population,
    character_weights,
    sample_population,
    user_ids,
)
from alignloop.sim.truth import TRUTH_SCHEMAS

DAY_S = 86_400.0
EVENT = {name: code for code, name in enumerate(EVENT_TYPES)}
USER, ASSISTANT = "user", "assistant"
EDIT_RATE = 0.08  # readers who trim an answer far longer than they like
LOW_EFFORT_STOCK = 0.6  # share of a low-effort person's messages that are a stock phrase


def world_tag(config: SimConfig) -> str:
    """Short id of a world, prefixed to every id in its logs so two worlds never collide."""
    return config_hash(config.model_dump(mode="json"))[:8]


def simulate(config: SimConfig, responder: Responder | None = None) -> tuple[dict[str, pa.Table], dict[str, pa.Table]]:
    """The whole world in memory: (log tables, ground-truth tables)."""
    logs: dict[str, list[pa.Table]] = {}
    truth: dict[str, list[pa.Table]] = {}
    for block_logs, block_truth in simulate_blocks(config, responder):
        for name, table in block_logs.items():
            logs.setdefault(name, []).append(table)
        for name, table in block_truth.items():
            truth.setdefault(name, []).append(table)
    return ({k: pa.concat_tables(v) for k, v in logs.items()}, {k: pa.concat_tables(v) for k, v in truth.items()})


def simulate_blocks(config: SimConfig, responder: Responder | None = None
                    ) -> Iterator[tuple[dict[str, pa.Table], dict[str, pa.Table]]]:
    """(log tables, ground-truth tables) for each block of `config.block_users` users, in order."""
    responder = responder if responder is not None else make_responder(config.responder)
    tag = world_tag(config)
    for number, first in enumerate(range(0, config.users, config.block_users)):
        n = min(config.block_users, config.users - first)
        yield _Block(config, tag, number, first, n, responder).run()


def describe_world(config: SimConfig) -> dict[str, Any]:
    """What a reader of the ground truth needs to interpret it (written as ground_truth/world.json)."""
    start = _start(config)
    return {
        "tag": world_tag(config),
        "start": start.isoformat(),
        "end": datetime.fromtimestamp(start.timestamp() + config.days * DAY_S, timezone.utc).isoformat(),
        "topics": {name: list(words) for name, words in TOPICS.items()},
        "unsafe_words": sorted(UNSAFE),
        "characters": [
            {"id": c.id, "name": c.name, "topic": TOPIC_NAMES[c.topic] if c.topic >= 0 else None,
             "roleplay": c.roleplay, "emoji": c.emoji, "system_prompt": c.system_prompt}
            for c in CHARACTERS[: config.characters]
        ],
        "engagement_weights": {f.name: getattr(eg.WEIGHTS, f.name) for f in fields(eg.WEIGHTS)},
        "kinds": list(KINDS),
    } | ({"difficulty": asdict(config.difficulty())} if config.difficulty().on else {})


def _arrow(texts: pa.Array | list[str]) -> pa.Array:
    return texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())


# The 5 ASCII digits of 0..99999, as 5-byte items.
_DIGITS5 = (48 + np.arange(100_000)[:, None] // 10 ** np.arange(4, -1, -1) % 10).astype(np.uint8).view("V5").ravel()


def fixed_width_ids(prefix: str, numbers: np.ndarray) -> pa.StringArray:
    """prefix + the number in 10 zero-padded digits (null where negative), built byte-wise in numpy.

    Fixed width keeps ids in creation order when sorted as text, and it is several times faster
    than formatting numbers one by one.
    """
    n = numbers.size
    head = prefix.encode("ascii")
    rest = np.maximum(numbers, 0)
    if n and rest.max() >= 10**10:
        raise ValueError("ids need more than 10 digits")
    record = np.empty(n, dtype=np.dtype([("head", f"V{len(head)}"), ("high", "V5"), ("low", "V5")]))
    record["head"] = np.void(head)
    high, low = np.divmod(rest, 100_000)
    record["high"] = _DIGITS5[high]
    record["low"] = _DIGITS5[low]
    width = len(head) + 10
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    null = numbers < 0
    validity = pa.py_buffer(np.packbits(~null, bitorder="little")) if null.any() else None
    return pa.Array.from_buffers(pa.string(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(record)],
                                 null_count=int(null.sum()))


def _start(config: SimConfig) -> datetime:
    return datetime.combine(config.start, time(), tzinfo=timezone.utc)


class _Columns:
    """Column chunks appended step by step, concatenated once at the end."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[Any]] = {}

    def add(self, **columns: Any) -> None:
        for name, value in columns.items():
            self.chunks.setdefault(name, []).append(value)

    def get(self, name: str) -> np.ndarray:
        parts = self.chunks.get(name, [])
        return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class _Lanes:
    """Running sessions, one lane each; every field is an array over lanes (chat: a list)."""

    user: np.ndarray
    session: np.ndarray
    day: np.ndarray
    start: np.ndarray
    t: np.ndarray          # seconds since the world started: when the lane's next action happens
    end: np.ndarray        # last action so far
    active: np.ndarray
    need_new: np.ndarray   # must start a conversation before the next message
    conv: np.ndarray
    char: np.ndarray
    exch: np.ndarray       # messages so far in the conversation
    n_conv: np.ndarray
    parent: np.ndarray     # turn the next user message answers (-1: none)
    pos: np.ndarray        # depth of the next user message
    qsum: np.ndarray
    qn: np.ndarray
    hist: np.ndarray       # piece ids of the last `history` settled answers, newest first
    prev: np.ndarray       # piece ids of the last settled answer
    chat: list[list[dict]] | None

    @staticmethod
    def open(user: np.ndarray, session: np.ndarray, day: np.ndarray, start: np.ndarray, history: int,
             text: bool) -> _Lanes:
        n = len(user)
        zeros = np.zeros(n, dtype=np.int64)
        return _Lanes(
            user=user, session=session, day=day, start=start, t=start.copy(), end=start.copy(),
            active=np.ones(n, dtype=bool), need_new=np.ones(n, dtype=bool), conv=zeros - 1, char=zeros.copy(),
            exch=zeros.copy(), n_conv=zeros.copy(), parent=zeros - 1, pos=zeros.copy(), qsum=np.zeros(n),
            qn=np.zeros(n), hist=np.full((n, history * WIDTH), -1, dtype=np.int32),
            prev=np.full((n, WIDTH), -1, dtype=np.int32), chat=[[] for _ in range(n)] if text else None,
        )

    def __len__(self) -> int:
        return len(self.user)

    def place(self, new: _Lanes) -> _Lanes:
        """Put `new` lanes into finished lanes' slots, growing the pool (doubling) when short."""
        pool = self
        free = np.flatnonzero(~pool.active)
        if free.size < len(new):
            grow = max(len(new) - free.size, len(pool))
            spare = _Lanes.open(np.zeros(grow, np.int64), np.zeros(grow, np.int64), np.zeros(grow, np.int64),
                                np.zeros(grow), pool.hist.shape[1] // WIDTH, pool.chat is not None)
            spare.active[:] = False
            grown = {}
            for f in fields(pool):
                mine, theirs = getattr(pool, f.name), getattr(spare, f.name)
                if f.name == "chat":
                    grown[f.name] = None if mine is None else mine + theirs
                else:
                    grown[f.name] = np.concatenate([mine, theirs])
            pool = _Lanes(**grown)
            free = np.flatnonzero(~pool.active)
        slots = free[: len(new)]
        for f in fields(pool):
            if f.name == "chat":
                if pool.chat is not None:
                    for slot, chat in zip(slots.tolist(), new.chat, strict=True):
                        pool.chat[slot] = chat
            else:
                getattr(pool, f.name)[slots] = getattr(new, f.name)
        return pool


@dataclass
class _Offer:
    """What one step puts before its lanes (one row each): candidate 0, and `candidates - 1` more
    (prefetched) for each row whose user swipes."""

    user: np.ndarray
    kind: np.ndarray
    ctx: Context
    first: Responses
    more: Responses | None   # the swipers' candidates, `candidates - 1` per swiper in row order
    feats: eg.Features       # first's rows, then more's
    taste: eg.Taste
    e: np.ndarray            # (rows, candidates) true engagement; nan where a candidate does not exist
    swipe: np.ndarray        # the row's user swiped at least once
    swipers: np.ndarray      # those rows
    er: np.ndarray           # row and column of every existing candidate, in turn order
    ej: np.ndarray
    fidx: np.ndarray         # each existing candidate's row in `feats`
    at: np.ndarray           # (rows, candidates) -> its place in turn order (-1: none)


@dataclass
class _View:
    """How the users of one step browsed their candidates; arrays over (rows, candidates) or rows."""

    seen: np.ndarray
    k: np.ndarray            # candidates seen
    words: np.ndarray
    reading: np.ndarray      # seconds spent reading each candidate (0: not seen)
    read_end: np.ndarray
    choice: np.ndarray       # the candidate settled on
    settled: np.ndarray      # when
    e_sel: np.ndarray        # its true engagement


class _Block:
    def __init__(self, config: SimConfig, tag: str, number: int, first: int, n: int, responder: Responder):
        self.cfg = config
        self.tag = tag
        self.number = number
        self.rng = np.random.default_rng([config.seed, number])
        self.pop: Population = sample_population(
            self.rng, first, n, config.days, config.bot_fraction, config.skimmer_fraction,
            config.activity_median, config.activity_sigma)
        self.scripts = bot_scripts(self.rng, self.pop)
        self.hard = config.difficulty()
        self.mimic, self.low_effort, self.read_share = self._hard_traits()
        self.cursor = np.zeros(n, dtype=np.int64)
        self.characters = CHARACTERS[: config.characters]
        self.char_cum = np.cumsum(character_weights(self.characters, self.pop.topics), axis=1)
        self.responder = responder
        self.text = responder.needs_text
        self.counts = {"sessions": 0, "conversations": 0, "turns": 0, "events": 0}
        self.sessions = _Columns()
        self.convs = _Columns()
        self.turns = _Columns()
        self.events = _Columns()
        self.event_text: dict[int, str] = {}
        self.cands = _Columns()
        self.day_rates = _Columns()

    def _hard_traits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bots passing as people, low-effort people, each user's share of answers read) of a hard world.

        Drawn after everything a default world draws, and only for knobs that are on, so a default
        world's random stream, and so its logs, are unchanged.
        """
        pop, rng, d, n = self.pop, self.rng, self.hard, self.pop.n
        mimic = np.zeros(n, dtype=bool)
        read_share = np.where(pop.kind == NORMAL, 1.0, 0.0)
        if d.mimic_bots > 0:
            mimic = (pop.kind == BOT) & (rng.random(n) < d.mimic_bots)
            read_share[mimic] = 1.0
        if d.partial_skimmers > 0:
            partial = (pop.kind == SKIMMER) & (rng.random(n) < d.partial_skimmers)
            read_share = np.where(partial, rng.uniform(0.2, 0.8, n), read_share)
        if d.distracted_readers > 0:
            distracted = (pop.kind == NORMAL) & (rng.random(n) < d.distracted_readers)
            read_share = np.where(distracted, 1.0 - rng.uniform(0.1, 0.7, n), read_share)
        low_effort = np.zeros(n, dtype=bool)
        if d.low_effort_people > 0:
            low_effort = (pop.kind == NORMAL) & (rng.random(n) < d.low_effort_people)
            read_share = np.where(low_effort, 1.0 - rng.uniform(0.3, 0.8, n), read_share)
        return mimic, low_effort, read_share

    def _ids(self, kind: str, n: int) -> np.ndarray:
        start = self.counts[kind]
        self.counts[kind] += n
        return np.arange(start, start + n, dtype=np.int64)

    # --- days and sessions ---------------------------------------------------------------------
    #
    # A user's visits on day d+1 depend only on how their own sessions of day d went, so each user
    # moves on to their next day as soon as their last session of the day ends, whatever the other
    # users are doing. Lanes of many days then run side by side, which keeps the steps few and wide.

    def run(self) -> tuple[dict[str, pa.Table], dict[str, pa.Table]]:
        pop = self.pop
        self.satisfaction = np.full(pop.n, 0.6)
        self.free_at = np.full(pop.n, -np.inf)
        self.today = np.full(pop.n, -1)
        self.running = np.zeros(pop.n, dtype=np.int64)
        self.day_quality = np.zeros(pop.n)
        self.day_visits = np.zeros(pop.n, dtype=np.int64)
        none = np.zeros(0, dtype=np.int64)
        self.lanes = _Lanes.open(none, none, none, np.zeros(0), self.cfg.history, self.text)
        self._schedule(np.arange(pop.n), pop.join_day)
        while True:
            active = np.flatnonzero(self.lanes.active)
            if active.size == 0:
                break
            self._step(self.lanes, active)
        return self._tables()

    def _schedule(self, users: np.ndarray, first_day: np.ndarray) -> None:
        """Plan each user's next day with visits, from `first_day` on, and open its sessions."""
        cfg, pop, rng = self.cfg, self.pop, self.rng
        users = users[first_day < cfg.days]
        first_day = first_day[first_day < cfg.days]
        if users.size == 0:
            return
        # Satisfaction stays put on days without visits, so the rate does too: draw all days at once.
        rate = eg.session_rate(pop.activity[users], self.satisfaction[users], pop.kind[users])
        span = cfg.days - int(first_day.min())
        draws = rng.poisson(rate[:, None], (users.size, span))
        draws[np.arange(span)[None, :] >= (cfg.days - first_day)[:, None]] = 0
        visit = draws > 0
        has = visit.any(axis=1)
        offset = visit.argmax(axis=1)
        users, day = users[has], first_day[has] + offset[has]
        k = np.minimum(draws[has, offset[has]], cfg.max_sessions_per_day)
        if users.size == 0:
            return

        user = np.repeat(users, k)
        kk = np.repeat(k, k)
        rank = np.arange(user.size) - np.repeat(np.cumsum(k) - k, k)
        spread = np.maximum(1.0, 12.0 / kk)
        hour = np.clip(pop.hour[user] + rng.normal(0.0, 1.0, user.size) + spread * (rank - (kk - 1) / 2), 0.0, 23.9)
        lane_day = np.repeat(day, k)
        start = lane_day * DAY_S + hour * 3600.0 + rng.uniform(0.0, 600.0, user.size)
        start = np.maximum(start, self.free_at[user] + 600.0)
        order = np.lexsort((start, user))
        user, start, lane_day = user[order], start[order], lane_day[order]
        self.running[users] += k
        self.today[users] = day
        self.day_quality[users] = 0.0
        self.day_visits[users] = 0
        new = _Lanes.open(user, self._ids("sessions", user.size), lane_day, start, self.cfg.history, self.text)
        self.lanes = self.lanes.place(new)

    def _retire(self, ln: _Lanes, lanes: np.ndarray) -> None:
        """Sessions that just ended; a user whose sessions of the day have all ended moves on."""
        ln.active[lanes] = False
        user = ln.user[lanes]
        quality = ln.qsum[lanes] / np.maximum(ln.qn[lanes], 1)
        self.sessions.add(id=ln.session[lanes], user=user, day=ln.day[lanes], start=ln.start[lanes],
                          end=ln.end[lanes], quality=quality)
        np.maximum.at(self.free_at, user, ln.end[lanes])
        np.add.at(self.day_quality, user, quality)
        np.add.at(self.day_visits, user, 1)
        np.subtract.at(self.running, user, 1)
        done = np.unique(user[self.running[user] == 0])
        if done.size == 0:
            return
        mean = self.day_quality[done] / self.day_visits[done]
        self.satisfaction[done] = eg.satisfaction_update(self.satisfaction[done], mean, np.ones(done.size, bool))
        rate = eg.session_rate(self.pop.activity[done], self.satisfaction[done], self.pop.kind[done])
        self.day_rates.add(key=done * self.cfg.days + self.today[done], rate=rate)
        self._schedule(done, self.today[done] + 1)

    # --- one exchange in every active lane ---------------------------------------------------------
    #
    # The phases run in a fixed order, that of the random draws and of the ids handed out, which
    # is part of what a seed means: the user's message, the candidates, browsing, thumbs/reports/
    # edits, then reply or leave.

    def _step(self, ln: _Lanes, a: np.ndarray) -> None:
        """One exchange in each lane of `a` (active lanes' indices; row i of every phase is lane a[i])."""
        self._new_conversations(ln, a[ln.need_new[a]])
        ctx, user_turn, msg_words = self._user_message(ln, a)
        offer = self._offer(ln, a, ctx)
        view = self._browse(ln, a, offer)
        cand_turn, texts = self._assistant_turns(ln, a, user_turn, offer, view)
        self._browse_events(ln, a, offer, view, cand_turn)
        sel_turn = cand_turn[np.arange(a.size), view.choice]
        done = self._reactions(ln, a, offer, view, cand_turn, sel_turn, texts)
        self._remember(ln, a, offer, view, texts, sel_turn, done)
        self._reply_or_leave(ln, a, offer, view, done, msg_words)

    def _user_message(self, ln: _Lanes, a: np.ndarray) -> tuple[Context, np.ndarray, np.ndarray]:
        """Each lane's user writes (a bot: the next line of its script), logged as a user turn.

        Returns the model's context, the user turns' ids and the messages' word counts.
        """
        pop, n = self.pop, a.size
        user, t = ln.user[a], ln.t[a]
        msg = write_messages(self.rng, pop, user)
        bots = np.flatnonzero((pop.kind[user] == BOT) & ~self.mimic[user])
        if bots.size:
            b = user[bots]
            msg[bots] = self.scripts[b, self.cursor[b] % self.scripts.shape[1]]
            self.cursor[b] += 1
        if self.hard.low_effort_people > 0:
            # People who often just say "Okay.": their messages repeat like a bot's script does.
            stock = np.flatnonzero(self.low_effort[user] & (self.rng.random(n) < LOW_EFFORT_STOCK))
            msg[stock] = -1
            msg[stock, 1] = PIECES.first("user_plain") + uniform_ints(self.rng, PIECES.count("user_plain"), stock.size)
        msg_texts = PIECES.render(msg)
        user_turn = self._ids("turns", n)
        self.turns.add(id=user_turn, conv=ln.conv[a], parent=ln.parent[a], role=np.zeros(n, np.int8),
                       pos=ln.pos[a], cand=np.zeros(n, np.int32), shown=np.ones(n, bool),
                       selected=np.ones(n, bool), t=t, text=msg_texts)
        self._event("message", a, ln, user_turn, np.full(n, np.nan), t)
        ctx = Context(characters=ln.char[a], user_pieces=msg, user_words=content_ids(msg), previous=ln.prev[a])
        if ln.chat is not None:
            ctx.user_texts = msg_texts.to_pylist()
            ctx.history = [ln.chat[i] for i in a.tolist()]
        return ctx, user_turn, PIECES.n_words[msg].sum(axis=1)

    def _offer(self, ln: _Lanes, a: np.ndarray, ctx: Context) -> _Offer:
        """Candidate 0 for every lane, and `candidates - 1` more for each lane whose user swipes."""
        pop, rng, c, n = self.pop, self.rng, self.cfg.candidates, a.size
        user = ln.user[a]
        kind = pop.kind[user]
        first = self.responder.respond(ctx, rng)
        f_first = self._features(first, ctx, ln, a)
        taste = eg.Taste.of(pop, user)
        e_first = eg.engagement(f_first, taste)
        swipe = rng.random(n) < eg.swipe_probability(e_first, kind)
        swipers = np.flatnonzero(swipe)
        e = np.full((n, c), np.nan)
        e[:, 0] = e_first
        slot = np.full(n, -1)  # row -> its block of candidates in `more`
        more, feats = None, f_first
        if swipers.size:
            rep = np.repeat(swipers, c - 1)
            ctx_more = ctx.take(rep)
            more = self.responder.respond(ctx_more, rng)
            f_more = self._features(more, ctx_more, ln, a[rep])
            e[swipers, 1:] = eg.engagement(f_more, eg.Taste.of(pop, user[rep])).reshape(swipers.size, c - 1)
            feats = eg.Features.concat([f_first, f_more])
            slot[swipers] = np.arange(swipers.size)
        exists = np.arange(c)[None, :] < np.where(swipe, c, 1)[:, None]
        er, ej = np.nonzero(exists)
        at = np.full((n, c), -1)
        at[er, ej] = np.arange(er.size)
        return _Offer(user=user, kind=kind, ctx=ctx, first=first, more=more, feats=feats, taste=taste, e=e,
                      swipe=swipe, swipers=swipers, er=er, ej=ej,
                      fidx=np.where(ej == 0, er, n + slot[er] * (c - 1) + ej - 1), at=at)

    def _browse(self, ln: _Lanes, a: np.ndarray, offer: _Offer) -> _View:
        """Candidates seen in order (after seeing candidate j >= 1 the user swipes on or stops), each
        read for a while, and the one settled on."""
        pop, rng, c, n = self.pop, self.rng, self.cfg.candidates, a.size
        user, kind, e, swipers = offer.user, offer.kind, offer.e, offer.swipers
        rows, cols = np.arange(n), np.arange(c)
        seen = np.zeros((n, c), dtype=bool)
        seen[:, 0] = True
        if swipers.size:
            seen[swipers, 1] = True
            on = rng.random((swipers.size, c)) < eg.swipe_probability(e[swipers], kind[swipers, None])
            for j in range(1, c - 1):
                seen[swipers, j + 1] = seen[swipers, j] & on[:, j]
        k = seen.sum(axis=1)
        words = np.zeros((n, c))
        words[offer.er, offer.ej] = offer.feats.n_words[offer.fidx]
        e0 = np.nan_to_num(e)
        noise = rng.standard_normal((n, c))
        if self.hard.mixed_reading:
            # A bot passing as a person dwells as long as a person would on an answer it does not read.
            dwell = np.where(self.mimic[user, None], 0.0, e0)
            reads = rng.random((n, c)) < self.read_share[user, None]
            reading = eg.reading_seconds(words, dwell, pop.read_speed[user, None], kind[:, None], noise, reads)
        else:
            reading = eg.reading_seconds(words, e0, pop.read_speed[user, None], kind[:, None], noise)
        reading = np.where(seen, reading, 0.0)
        shown_at = ln.t[a] + eg.LATENCY_S
        read_end = shown_at[:, None] + np.cumsum(reading, axis=1) + eg.SWIPE_S * cols[None, :]
        probs = eg.choice_probabilities(e0, seen, pop.choosiness[user], kind)
        choice = np.minimum((rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1), k - 1)
        settled = read_end[rows, k - 1] + np.where(offer.swipe, eg.SWIPE_S * (1 + (k - 1 - choice)), 0.0)
        return _View(seen=seen, k=k, words=words, reading=reading, read_end=read_end, choice=choice,
                     settled=settled, e_sel=e[rows, choice])

    def _assistant_turns(self, ln: _Lanes, a: np.ndarray, user_turn: np.ndarray, offer: _Offer, view: _View
                         ) -> tuple[np.ndarray, pa.StringArray]:
        """Every candidate, shown or only prefetched, as an assistant turn (and its ground truth).

        Returns the turn id per (lane row, candidate) (-1: none) and the texts in turn order.
        """
        n, c = a.size, self.cfg.candidates
        er, ej, first, more = offer.er, offer.ej, offer.first, offer.more
        cand_turn = np.full((n, c), -1, dtype=np.int64)
        cand_turn[er, ej] = self._ids("turns", er.size)
        if first.pieces is not None:  # render once, already in turn order
            all_pieces = first.pieces if more is None else np.concatenate([first.pieces, more.pieces])
            texts = PIECES.render(all_pieces[offer.fidx])
        else:
            texts = pa.concat_arrays([_arrow(first.texts)] + ([_arrow(more.texts)] if more is not None else []))
            texts = texts.take(pa.array(offer.fidx))  # one per candidate, in turn order
        created = np.where(view.seen, view.read_end - view.reading, view.read_end[:, :1])
        self.turns.add(id=cand_turn[er, ej], conv=ln.conv[a][er], parent=user_turn[er],
                       role=np.ones(er.size, np.int8), pos=ln.pos[a][er] + 1, cand=ej.astype(np.int32),
                       shown=view.seen[er, ej], selected=ej == view.choice[er], t=created[er, ej],
                       text=texts)
        self._candidate_truth(offer, cand_turn[er, ej])
        return cand_turn, texts

    def _candidate_truth(self, offer: _Offer, turn: np.ndarray) -> None:
        """Ground truth of each candidate turn (`turn`: their ids, in turn order)."""
        er, ej = offer.er, offer.ej
        f_all = offer.feats.take(offer.fidx)
        e_all = offer.e[er, ej]
        kind_all = offer.kind[er]
        self.cands.add(turn=turn, user=offer.user[er], engagement=e_all,
                       p_swipe=eg.swipe_probability(e_all, kind_all),
                       p_continue=eg.continue_probability(e_all, self.pop.patience[offer.user[er]], kind_all),
                       topic_match=eg.topic_match(f_all.topic_counts, offer.taste.topics[er]),
                       **{f.name: getattr(f_all, f.name) for f in fields(f_all) if f.name != "topic_counts"})

    def _browse_events(self, ln: _Lanes, a: np.ndarray, offer: _Offer, view: _View, cand_turn: np.ndarray) -> None:
        """Events of the browsing: reads, swipes, the selection."""
        sr, sj = np.nonzero(view.seen)
        self._event("read", a[sr], ln, cand_turn[sr, sj], view.reading[sr, sj], view.read_end[sr, sj])
        on_swipe = sj < view.k[sr] - 1
        self._event("swipe", a[sr[on_swipe]], ln, cand_turn[sr, sj][on_swipe], sj[on_swipe] + 1.0,
                    view.read_end[sr, sj][on_swipe])
        swipers, choice = offer.swipers, view.choice
        self._event("select", a[swipers], ln, cand_turn[swipers, choice[swipers]], choice[swipers].astype(float),
                    view.settled[swipers])

    def _reactions(self, ln: _Lanes, a: np.ndarray, offer: _Offer, view: _View, cand_turn: np.ndarray,
                   sel_turn: np.ndarray, texts: pa.StringArray) -> np.ndarray:
        """Thumbs on the answer settled on, safety reports on any candidate seen, edits of an answer far
        longer than the reader likes. Returns when each lane's user is done with them (seconds)."""
        pop, rng, c, n = self.pop, self.rng, self.cfg.candidates, a.size
        user, kind, choice = offer.user, offer.kind, view.choice
        up, down = eg.vote_probabilities(view.e_sel, pop.vote_rate[user], kind)
        u = rng.random(n)
        vote = np.where(u < up, 1.0, np.where(u < up + down, -1.0, 0.0))
        if self.hard.label_noise > 0:
            vote = np.where(rng.random(n) < self.hard.label_noise, -vote, vote)
        voted = np.flatnonzero(vote != 0)
        self._event("vote", a[voted], ln, sel_turn[voted], vote[voted], view.settled[voted] + 1.0)
        done = view.settled + np.where(vote != 0, 1.0, 0.0)
        unsafe = np.zeros((n, c))
        unsafe[offer.er, offer.ej] = offer.feats.n_unsafe[offer.fidx]
        reported = view.seen & (rng.random((n, c)) < eg.report_probability(unsafe, kind[:, None]))
        rr, rj = np.nonzero(reported)
        self._event("report", a[rr], ln, cand_turn[rr, rj], np.full(rr.size, np.nan), view.read_end[rr, rj] + 0.5,
                    ["unsafe content"] * rr.size)
        np.maximum.at(done, rr, view.read_end[rr, rj] + 0.5)
        sel_words = view.words[np.arange(n), choice]
        edit = np.flatnonzero((kind == NORMAL) & (sel_words > 2.2 * pop.pref_len[user]) & (rng.random(n) < EDIT_RATE))
        if edit.size:
            keep = np.rint(pop.pref_len[user[edit]]).astype(int)
            new_text = [" ".join(texts[int(offer.at[r, choice[r]])].as_py().split()[:w])
                        for r, w in zip(edit.tolist(), keep.tolist())]
            self._event("edit", a[edit], ln, sel_turn[edit], np.full(edit.size, np.nan), done[edit] + 2.0, new_text)
            done[edit] += 2.0
        return done

    def _remember(self, ln: _Lanes, a: np.ndarray, offer: _Offer, view: _View, texts: pa.StringArray,
                  sel_turn: np.ndarray, done: np.ndarray) -> None:
        """The lanes take in the answer settled on: quality so far, position, what was said."""
        c, rows, choice = self.cfg.candidates, np.arange(a.size), view.choice
        ln.qsum[a] += eg.quality(view.e_sel)
        ln.qn[a] += 1
        ln.parent[a] = sel_turn
        ln.pos[a] += 2
        ln.exch[a] += 1
        ln.end[a] = done
        first, more, swipers = offer.first, offer.more, offer.swipers
        if first.pieces is not None:
            pieces = np.full((a.size, c, WIDTH), -1, dtype=np.int32)
            pieces[:, 0] = first.pieces
            if more is not None:
                pieces[swipers, 1:] = more.pieces.reshape(swipers.size, c - 1, WIDTH)
            chosen = pieces[rows, choice]
            ln.prev[a] = chosen
            if ln.hist.shape[1]:
                ln.hist[a] = np.concatenate([chosen, ln.hist[a][:, : ln.hist.shape[1] - WIDTH]], axis=1)
        if ln.chat is not None:
            chosen_texts = texts.take(pa.array(offer.at[rows, choice])).to_pylist()
            for lane, said, answer in zip(a.tolist(), offer.ctx.user_texts, chosen_texts, strict=True):
                ln.chat[lane].append({"role": USER, "content": said})
                ln.chat[lane].append({"role": ASSISTANT, "content": answer})

    def _reply_or_leave(self, ln: _Lanes, a: np.ndarray, offer: _Offer, view: _View, done: np.ndarray,
                        msg_words: np.ndarray) -> None:
        """Each user replies after thinking and typing, or leaves the conversation: then opens
        another one a little later, or ends the session."""
        cfg, pop, rng, n = self.cfg, self.pop, self.rng, a.size
        kind = offer.kind
        p_continue = eg.continue_probability(view.e_sel, pop.patience[offer.user], kind)
        cont = (rng.random(n) < p_continue) & (ln.exch[a] < cfg.max_turns)
        wait = eg.seconds_to_next_message(view.e_sel, msg_words, kind, rng.standard_normal(n), rng.random(n),
                                          self.mimic[offer.user] if self.hard.mimic_bots > 0 else None)
        ln.t[a] = np.where(cont, done + wait, done)
        leave = a[~cont]
        if leave.size:
            lu = ln.user[leave]
            p_new = eg.new_conversation_probability(ln.qsum[leave] / ln.qn[leave], pop.patience[lu], pop.kind[lu])
            again = (rng.random(leave.size) < p_new) & (ln.n_conv[leave] < cfg.max_conversations)
            ln.need_new[leave[again]] = True
            ln.t[leave[again]] += rng.uniform(20.0, 120.0, int(again.sum()))
            self._retire(ln, leave[~again])

    def _new_conversations(self, ln: _Lanes, lanes: np.ndarray) -> None:
        if lanes.size == 0:
            return
        conv = self._ids("conversations", lanes.size)
        u = self.rng.random(lanes.size)[:, None]
        char = np.minimum((u > self.char_cum[ln.user[lanes]]).sum(axis=1), len(self.characters) - 1)
        self.convs.add(id=conv, session=ln.session[lanes], user=ln.user[lanes], char=char, t=ln.t[lanes])
        ln.conv[lanes] = conv
        ln.char[lanes] = char
        ln.exch[lanes] = 0
        ln.parent[lanes] = -1
        ln.pos[lanes] = 0
        ln.hist[lanes] = -1
        ln.prev[lanes] = -1
        ln.need_new[lanes] = False
        ln.n_conv[lanes] += 1
        if ln.chat is not None:
            for lane in lanes.tolist():
                ln.chat[lane] = []

    def _features(self, responses: Responses, ctx: Context, ln: _Lanes, lanes: np.ndarray) -> eg.Features:
        if responses.pieces is not None:
            return eg.features_from_pieces(responses.pieces, ctx.user_words, ln.hist[lanes])
        h = self.cfg.history
        histories = [
            [m["content"] for m in ln.chat[lane] if m["role"] == ASSISTANT][-h:] if h else []
            for lane in lanes.tolist()
        ]
        return eg.measure(responses.text_list(), ctx.user_texts, histories)

    def _event(self, type_: str, lanes: np.ndarray, ln: _Lanes, turn: np.ndarray, value: np.ndarray,
               t: np.ndarray, texts: list[str] | None = None) -> None:
        n = len(lanes)
        if n == 0:
            return
        ids = self._ids("events", n)
        if texts is not None:
            self.event_text.update(zip(ids.tolist(), texts))
        self.events.add(id=ids, type=np.full(n, EVENT[type_], np.int8), user=ln.user[lanes],
                        session=ln.session[lanes], conv=ln.conv[lanes], turn=turn,
                        value=np.asarray(value, dtype=float), t=t)

    # --- tables ----------------------------------------------------------------------------------

    def _tables(self) -> tuple[dict[str, pa.Table], dict[str, pa.Table]]:
        pop, prefix = self.pop, f"{self.tag}-"
        start_ms = int(_start(self.cfg).timestamp() * 1000)

        def ts(seconds: np.ndarray) -> pa.Array:
            return pa.array(start_ms + np.rint(seconds * 1000.0).astype(np.int64), type=TIMESTAMP)

        def ids(kind: str, numbers: np.ndarray) -> pa.Array:
            return fixed_width_ids(f"{prefix}{kind}{self.number}-", np.asarray(numbers, dtype=np.int64))

        uid = pa.array(user_ids(self.tag, pop.index), pa.string())
        # Sessions were recorded as they ended; list them in id (= start) order.
        order = np.argsort(self.sessions.get("id"), kind="stable")
        s = {name: self.sessions.get(name)[order] for name in ("id", "user", "day", "start", "end", "quality")}
        s_user = s["user"].astype(np.int64)
        s_start = s["start"]
        first_seen = np.full(pop.n, np.inf)
        np.minimum.at(first_seen, s_user, s_start)
        seen = np.flatnonzero(np.isfinite(first_seen))
        users = pa.table({"user_id": uid.take(pa.array(seen)), "first_seen": ts(first_seen[seen])})
        sessions = pa.table({
            "session_id": ids("s", s["id"]), "user_id": uid.take(pa.array(s_user)),
            "started_at": ts(s_start), "ended_at": ts(s["end"]),
        })
        chars = self.characters
        c_char = pa.array(self.convs.get("char").astype(np.int64))
        conversations = pa.table({
            "conversation_id": ids("c", self.convs.get("id")),
            "session_id": ids("s", self.convs.get("session")),
            "user_id": uid.take(pa.array(self.convs.get("user").astype(np.int64))),
            "character_id": pa.array([ch.id for ch in chars]).take(c_char),
            "character_name": pa.array([ch.name for ch in chars]).take(c_char),
            "system_prompt": pa.array([ch.system_prompt for ch in chars]).take(c_char),
            "model_version": pa.array([self.responder.model_version] * len(c_char), pa.string()),
            "started_at": ts(self.convs.get("t")),
        })
        turns = pa.table({
            "turn_id": ids("t", self.turns.get("id")),
            "conversation_id": ids("c", self.turns.get("conv")),
            "parent_id": ids("t", self.turns.get("parent")),
            "role": pa.array([USER, ASSISTANT]).take(pa.array(self.turns.get("role").astype(np.int64))),
            "text": pa.chunked_array(self.turns.chunks.get("text", []), pa.string()),
            "position": pa.array(self.turns.get("pos").astype(np.int32)),
            "candidate_index": pa.array(self.turns.get("cand").astype(np.int32)),
            "shown": pa.array(self.turns.get("shown").astype(bool)),
            "selected": pa.array(self.turns.get("selected").astype(bool)),
            "created_at": ts(self.turns.get("t")),
        })
        event_ids = self.events.get("id").astype(np.int64)
        value = self.events.get("value")
        # Event ids are handed out in the order events are added, so id = row.
        text = np.full(event_ids.size, None, dtype=object)
        for i, t in self.event_text.items():
            text[i] = t
        events = pa.table({
            "event_id": ids("e", event_ids),
            "type": pa.array(EVENT_TYPES).take(pa.array(self.events.get("type").astype(np.int64))),
            "user_id": uid.take(pa.array(self.events.get("user").astype(np.int64))),
            "session_id": ids("s", self.events.get("session")),
            "conversation_id": ids("c", self.events.get("conv")),
            "turn_id": ids("t", self.events.get("turn")),
            "value": pa.array(value, mask=np.isnan(value)),
            "text": pa.array(text, pa.string()),
            "timestamp": ts(self.events.get("t")),
        })
        logs = {"users": users, "sessions": sessions, "conversations": conversations, "turns": turns, "events": events}
        return {name: conform(name, table) for name, table in logs.items()}, self._truth(uid, ids, s)

    def _truth(self, uid: pa.Array, ids, s: dict[str, np.ndarray]) -> dict[str, pa.Table]:
        pop = self.pop
        f32 = lambda x: pa.array(np.asarray(x, dtype=np.float32))  # noqa: E731
        i32 = lambda x: pa.array(np.asarray(x, dtype=np.int32))  # noqa: E731
        kind = np.asarray(pop.kind, dtype=np.int64)
        topics = pa.FixedSizeListArray.from_arrays(pa.array(pop.topics.astype(np.float32).ravel()),
                                                   pop.topics.shape[1]).cast(pa.list_(pa.float32()))
        users = pa.table({
            "user_id": uid, "kind": pa.array(KINDS).take(pa.array(kind)),
            "is_bot": pa.array(kind == BOT), "is_skimmer": pa.array(kind == SKIMMER),
            "pref_len": f32(pop.pref_len), "question_taste": f32(pop.question_taste),
            "emoji_taste": f32(pop.emoji_taste), "gesture_taste": f32(pop.gesture_taste),
            "topic_interest": topics,
            "favourite_topic": pa.array(TOPIC_NAMES).take(pa.array(pop.topics.argmax(axis=1))),
            "activity": f32(pop.activity), "patience": f32(pop.patience), "read_speed": f32(pop.read_speed),
            "vote_rate": f32(pop.vote_rate), "choosiness": f32(pop.choosiness),
        })
        c = self.cands
        e = c.get("engagement")
        candidates = pa.table({
            "turn_id": ids("t", c.get("turn")), "user_id": uid.take(pa.array(c.get("user").astype(np.int64))),
            "engagement": f32(e), "quality": f32(eg.quality(e)), "p_swipe": f32(c.get("p_swipe")),
            "p_continue": f32(c.get("p_continue")), "n_words": i32(c.get("n_words")),
            "asks_question": pa.array(c.get("asks_question").astype(bool)), "n_emoji": i32(c.get("n_emoji")),
            "n_gestures": i32(c.get("n_gestures")), "relevance": f32(c.get("relevance")),
            "topic_match": f32(c.get("topic_match")), "repeat_within": f32(c.get("repeat_within")),
            "repeat_across": f32(c.get("repeat_across")), "n_unsafe": i32(c.get("n_unsafe")),
        })
        # The return rate after the day of each session (same for all sessions of a user's day).
        keys, rates = self.day_rates.get("key").astype(np.int64), self.day_rates.get("rate")
        by_key = np.argsort(keys)
        at = by_key[np.searchsorted(keys[by_key], s["user"].astype(np.int64) * self.cfg.days + s["day"])]
        rate = rates[at]
        sessions = pa.table({
            "session_id": ids("s", s["id"]), "user_id": uid.take(pa.array(s["user"].astype(np.int64))),
            "quality": f32(s["quality"]), "p_return_1d": f32(eg.return_probability(rate, 1.0)),
            "p_return_7d": f32(eg.return_probability(rate, 7.0)),
        })
        truth = {"users": users, "candidates": candidates, "sessions": sessions}
        return {name: conform(name, table, TRUTH_SCHEMAS) for name, table in truth.items()}
