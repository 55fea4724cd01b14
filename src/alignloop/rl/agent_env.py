"""`[env] kind = "agent"`: coding tasks in sandboxes (alignloop.agentenv), as an RL Environment.

The policy fixes small Python repositories with failing tests by calling tools (read/write/edit
files, grep, semantic search, shell, lint, run the tests) in a bubblewrap sandbox of its own per
episode; the reward is the share of the task's tests passing at the end, minus a penalty per
malformed tool call. `url` empty: sandboxes on this machine; else an `alignloop env serve` server
plays them, and this adapter cannot tell the difference (same calls, same answers).

`heldout_eval` plays held-out tasks (their own split: no training step draws them) greedily and
gives each task's pass rate; `paired_change` compares two such lists task by task (the mean
difference, its 95% interval and a paired p-value); `run_agent_rl`
(`alignloop env rl RECIPE`) is before -> GRPO -> after on the same held-out tasks.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field
from scipy import stats

from alignloop.agentenv.client import RemoteEpisodes
from alignloop.agentenv.episodes import Episodes
from alignloop.agentenv.limits import SandboxLimits
from alignloop.agentenv.tasks import TASKS_PER_LEVEL, Task, sample_tasks, task_set
from alignloop.engine.api import SamplingParams
from alignloop.rl.env import EnvSectionBase, Step

HELDOUT = "heldout.json"


class AgentEnv:
    name = "agent"

    def __init__(self, section: AgentEnvSection) -> None:
        self.section = section
        s = section
        common = {"family": s.tool_family, "limits": s.limits, "max_turns": s.max_turns,
                  "max_calls": s.max_tool_calls, "penalty": s.penalty, "tools": s.tools,
                  "code_blocks": s.code_blocks}
        self.episodes: Episodes | RemoteEpisodes = RemoteEpisodes(s.url, **common) if s.url else Episodes(**common)

    def sample_tasks(self, n: int, seed: int) -> list[Task]:
        s = self.section
        return sample_tasks(s.difficulty, n, seed, "train", s.task_pool, s.task_seed)

    def heldout_tasks(self) -> list[Task]:
        return task_set(self.section.difficulty, self.section.eval_tasks, "heldout", self.section.task_seed)

    def reset(self, tasks: list[Task]) -> list[list[dict]]:
        return self.episodes.reset(tasks)

    def step(self, actions: list[str | None]) -> Step:
        out = self.episodes.step(actions)
        return Step(out.observations, np.asarray(out.rewards, dtype=float), np.asarray(out.done, dtype=bool),
                    out.info)

    def close(self) -> None:
        self.episodes.close()


class AgentEnvSection(EnvSectionBase):
    """`[env] kind = "agent"`: fix small Python repositories in sandboxes, rewarded by their tests."""

    kind: Literal["agent"] = "agent"
    max_turns: int = Field(3, ge=1, description="policy replies per episode; the last one's tool calls still run")
    difficulty: Literal["guided", "trivial", "easy", "medium", "hard"] = "easy"
    task_pool: int = Field(TASKS_PER_LEVEL, ge=1, le=TASKS_PER_LEVEL,
                           description="training tasks are drawn from the first N of the difficulty's train split")
    task_seed: int = Field(0, description="which generated task set (train and held-out splits both)")
    eval_tasks: int = Field(32, ge=0, le=TASKS_PER_LEVEL, description="held-out tasks of `alignloop env rl`")
    tool_family: str = Field("qwen2.5", description="chat family whose tool-call syntax the replies are parsed in")
    max_tool_calls: int = Field(4, ge=1, description="tool calls run per reply (more are answered 'not run')")
    penalty: float = Field(0.1, ge=0, description="reward taken per malformed tool call (0.5 at most in all)")
    tools: list[str] | None = Field(None, description="names of the tools offered (default: all of them)")
    code_blocks: bool = Field(False, description="also read fenced Python blocks as whole-file writes (the "
                              "edit format for policies too small to write JSON tool calls)")
    url: str = Field("", description="an `alignloop env serve` server's URL; empty: sandboxes on this machine")
    limits: SandboxLimits = SandboxLimits()

    def build(self, prompts: list[list[dict]] | None = None) -> AgentEnv:
        return AgentEnv(self)


# --- held-out evaluation ---------------------------------------------------------------------------


@dataclass
class PairedChange:
    before: float
    after: float
    diff: float
    ci_low: float
    ci_high: float
    better: int          # tasks whose pass rate rose
    worse: int
    p_value: float       # two-sided sign-flip test of the per-task differences
    n: int

    def line(self) -> str:
        return (f"held-out pass rate {self.before:.3f} -> {self.after:.3f} (diff {self.diff:+.3f}, 95% CI "
                f"[{self.ci_low:+.3f}, {self.ci_high:+.3f}], {self.better} tasks better, {self.worse} worse, "
                f"p = {self.p_value:.3g}, n = {self.n})")


def paired_change(before: list[float], after: list[float]) -> PairedChange:
    """Per-task pass rates before vs after on the same tasks. The p-value: the exact sign-flip test
    (all 2^k sign patterns of the k non-zero differences) for k <= 16; above, Wilcoxon's signed-rank
    test (normal approximation; a Monte-Carlo sign-flip test would floor at 1/draws)."""
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.shape != a.shape or b.size == 0:
        raise ValueError(f"need the same tasks before and after, got {b.size} and {a.size}")
    d = a - b
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(d.size) if d.size > 1 else math.inf
    nz = d[d != 0]
    if nz.size == 0:
        p = 1.0
    elif nz.size <= 16:
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=nz.size)))
        p = float(np.mean(np.abs(signs @ nz) >= abs(float(nz.sum())) - 1e-12))
    else:
        p = float(stats.wilcoxon(nz, zero_method="wilcox", method="approx").pvalue)
    return PairedChange(float(b.mean()), float(a.mean()), float(d.mean()), float(d.mean()) - half,
                        float(d.mean()) + half, int((d > 0).sum()), int((d < 0).sum()), p, int(d.size))


def heldout_eval(env: AgentEnv, inference: Any, tokenizer: Any, recipe: Any) -> list[float]:
    """Each held-out task's pass rate under greedy decoding (an episode cut off by the context is 0)."""
    from alignloop.rl.rollout import play
    greedy = SamplingParams(temperature=0.0, max_tokens=recipe.sampling.max_tokens)
    r = play(env, inference, tokenizer, env.heldout_tasks(), 1, greedy, seed=10_000_019,
             max_turns=recipe.env.max_turns, max_context=recipe.rl.max_context)
    return [float(t.info.get("pass_rate", 0.0)) for t in r.trajectories]


def _pass_rates(recipe: Any, env: AgentEnv, model_name: str) -> list[float]:
    from alignloop.rl.backend import make_engine
    from alignloop.rl.inference import Inference
    from alignloop.train import session
    model, tokenizer = session.load_base_model(recipe.model.model_copy(update={"name": model_name}))
    engine = make_engine(recipe, model, tokenizer, "float32")
    return heldout_eval(env, Inference(engine), tokenizer, recipe)


def run_agent_rl(recipe: Any, run: str | None = None, force: bool = False,
                 say: Any = print) -> tuple[PairedChange, Any]:
    """Held-out pass rates of the recipe's model, RL on the agent environment, the same tasks again."""
    from alignloop.rl.stage import run_rl
    env = recipe.env.build()
    try:
        before = _pass_rates(recipe, env, recipe.model.name)
        say(f"agent env: held-out pass rate before RL {np.mean(before):.3f} on {len(before)} "
            f"{recipe.env.difficulty} tasks")
        stage = run_rl(recipe, run, force, env=env)
        after = _pass_rates(recipe, env, str(stage.path("model")))
        change = paired_change(before, after)
        (stage.dir / HELDOUT).write_text(json.dumps({**asdict(change), "before_per_task": before,
                                                      "after_per_task": after}, indent=1))
        say("agent env: " + change.line())
        return change, stage
    finally:
        env.close()
