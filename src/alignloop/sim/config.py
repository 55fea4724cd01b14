"""Recipe sections of the simulator: the world (`SimConfig`) and the deployed model answering in it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import date
from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from alignloop.recipes import Section
from alignloop.sections import RunSection


class TemplateSection(Section):
    """The built-in response sampler's controlled variation (all rates are per response)."""

    length_median: float = Field(40.0, gt=0, description="median target length, words")
    length_sigma: float = Field(0.7, ge=0, description="spread of log length")
    question: float = Field(0.35, ge=0, le=1, description="asks a follow-up question")
    emoji: float = Field(0.3, ge=0, le=1, description="adds emojis (times the character's emoji style)")
    gesture: float = Field(0.3, ge=0, le=1, description="adds *gestures* (times the character's role-play style)")
    echo: float = Field(0.5, ge=0, le=1, description="picks up each of the user's content words")
    topic: float = Field(0.3, ge=0, le=1, description="talks about the character's topic, per sentence")
    repeat: float = Field(0.05, ge=0, le=1, description="repeats its previous answer in the conversation")
    repeat_within: float = Field(0.03, ge=0, le=1, description="says a sentence twice")
    unsafe: float = Field(0.02, ge=0, le=1, description="says something unsafe")


class EngineResponderSection(Section):
    """A real model through `alignloop.engine` (slow: for small worlds or a GPU)."""

    model: str = "tiny"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(64, ge=1)
    max_batch: int = Field(64, ge=1)


class ResponderSection(Section):
    kind: Literal["template", "engine"] = "template"
    model_version: str | None = Field(None, description="logged per conversation; default: from kind and model")
    template: TemplateSection = TemplateSection()
    engine: EngineResponderSection = EngineResponderSection()

    def version(self) -> str:
        if self.model_version:
            return self.model_version
        return "template-v1" if self.kind == "template" else f"engine:{self.engine.model}"


@dataclass(frozen=True)
class Difficulty:
    """What makes a world harder to clean than the default one (all 0: the default world)."""

    mimic_bots: float = 0.0
    partial_skimmers: float = 0.0
    distracted_readers: float = 0.0
    low_effort_people: float = 0.0
    label_noise: float = 0.0

    @property
    def on(self) -> bool:
        return any(v > 0 for v in asdict(self).values())

    @property
    def mixed_reading(self) -> bool:
        """Some users read some answers and glance at others (a draw per answer decides which)."""
        return (self.mimic_bots > 0 or self.partial_skimmers > 0 or self.distracted_readers > 0
                or self.low_effort_people > 0)


HARD = Difficulty(mimic_bots=0.5, partial_skimmers=0.6, distracted_readers=0.1, low_effort_people=0.1,
                  label_noise=0.1)
"""`hard = true`: half the bots pass as people, most skimmers read some answers, a tenth of the
people skim some, another tenth write stock phrases and skim, a tenth of the thumbs point the wrong way."""

DIFFICULTY_KEYS = ("hard", *(f.name for f in fields(Difficulty)))


class SimConfig(Section):
    """A simulated world: who is in it, for how long, and how the product behaves."""

    seed: int = 0
    users: int = Field(2000, ge=1)
    days: int = Field(14, ge=1, le=3650)
    start: date = Field(date(2026, 1, 5), description="first simulated day (UTC)")
    bot_fraction: float = Field(0.03, ge=0, le=1)
    skimmer_fraction: float = Field(0.08, ge=0, le=1)
    activity_median: float = Field(0.4, gt=0, description="median sessions per day when satisfied")
    activity_sigma: float = Field(1.2, ge=0, description="spread of log activity: the heavy tail")
    characters: int = Field(10, ge=1, le=10, description="how many of the built-in characters exist")
    candidates: int = Field(4, ge=2, le=16, description="candidates prefetched when the user first swipes")
    max_turns: int = Field(30, ge=1, description="user messages per conversation, at most")
    max_conversations: int = Field(5, ge=1, description="conversations per session, at most")
    max_sessions_per_day: int = Field(8, ge=1)
    history: int = Field(3, ge=0, description="earlier responses a repetition is checked against")
    block_users: int = Field(8192, ge=1, description="users simulated together (part of the seed's meaning)")
    responder: ResponderSection = ResponderSection()
    # A harder world (off by default): users the log filters cannot cleanly separate, and noisy labels.
    # Filters are tuned on the default world, where bots and skimmers are easy to tell from people;
    # these knobs measure how they hold up when they are not. Each knob left unset is 0, or its
    # value in the `hard` preset when hard = true.
    hard: bool = Field(False, description="the hard preset: mimic_bots 0.5, partial_skimmers 0.6, distracted_readers "
                                          "0.1, low_effort_people 0.1, label_noise 0.1 (each knob overrides it)")
    mimic_bots: float | None = Field(None, ge=0, le=1, description="share of bots that pass as people: varied "
                                     "messages, human reply times (with their spread), dwelling on answers as if read")
    partial_skimmers: float | None = Field(None, ge=0, le=1, description="share of skimmers who read some answers "
                                           "(each a random 20-80% of them) and glance at the rest")
    distracted_readers: float | None = Field(None, ge=0, le=1, description="share of people who glance at some "
                                             "answers (each a random 10-70% of them) and read the rest")
    low_effort_people: float | None = Field(None, ge=0, le=1, description="share of people who answer with a stock "
                                            "phrase ('Okay.') in 60% of their messages and glance at 30-80% of answers")
    label_noise: float | None = Field(None, ge=0, le=1, description="share of thumbs that point the wrong way")

    @model_validator(mode="after")
    def _fractions(self) -> SimConfig:
        if self.bot_fraction + self.skimmer_fraction > 1:
            raise ValueError("bot_fraction + skimmer_fraction must be at most 1")
        return self

    def difficulty(self) -> Difficulty:
        base = HARD if self.hard else Difficulty()
        return Difficulty(**{f.name: getattr(base, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                             for f in fields(Difficulty)})

    @model_serializer(mode="wrap")
    def _same_default_world(self, handler: Any) -> dict[str, Any]:
        # The world's id (`world_tag`), every id in its logs and the stages' skip keys hash this
        # dump: a world with no difficulty dumps as it did before the knobs existed, so its logs,
        # splits and numbers stay the same.
        data = handler(self)
        if not self.difficulty().on:
            for key in DIFFICULTY_KEYS:
                data.pop(key, None)
        return data


class OutputSection(Section):
    format: Literal["parquet", "jsonl"] = "parquet"


class SimulateRecipe(Section):
    run: RunSection = RunSection()
    simulate: SimConfig = SimConfig()
    output: OutputSection = OutputSection()
    # One recipe may carry the whole log pipeline (recipes/logs.toml); the later stages check
    # their own sections, and the simulate stage's config (its skip key) leaves them out.
    ingest: dict[str, Any] = {}
    filter: dict[str, Any] = {}
    build: dict[str, Any] = {}

    def stage_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", include={"run", "simulate", "output"})
