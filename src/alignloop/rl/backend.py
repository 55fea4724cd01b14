"""The roles an RL run drives, built once: in this process (`local`) or as Ray actors (`ray`).

Either way the step loop gets the same `Roles`: `env` and `inference` for `play()`, `trainer`
(step, weights, checkpoints, the final model), `dual` (the reward's safety multiplier, or None),
and the driver's `tokenizer`. Used as a context manager, the roles are stopped on the way out
(the Ray actors ended; nothing to do locally).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alignloop.engine.engine import Engine
from alignloop.errors import AlignloopError
from alignloop.models import load_tokenizer
from alignloop.rl import ray_backend
from alignloop.rl.config import RLRecipe
from alignloop.rl.env import Environment
from alignloop.rl.inference import Inference
from alignloop.rl.safety import StepDual, attach
from alignloop.rl.trainer import TrainerRole
from alignloop.train import session


@dataclass
class Roles:
    env: Environment
    inference: Inference          # or ray_backend.RemoteInference
    trainer: TrainerRole          # or ray_backend.RemoteTrainer
    dual: StepDual | None         # or ray_backend.RemoteDual
    tokenizer: Any
    stop: Callable[[], None] = field(default=lambda: None)

    def __enter__(self) -> Roles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_roles(backend: str, recipe: RLRecipe, env: Environment, engine_dtype: str = "float32") -> Roles:
    """The roles of `backend` ("local" or "ray") for `recipe`, playing `env`."""
    builders = {"local": local_roles, "ray": ray_roles}
    if backend not in builders:
        raise AlignloopError(f"--backend {backend}: expected 'local' or 'ray'")
    return builders[backend](recipe, env, engine_dtype)


def local_roles(recipe: RLRecipe, env: Environment, engine_dtype: str) -> Roles:
    """One process: the engine and the trainer share the machine; async mode adds a thread."""
    model, tokenizer = session.load_base_model(recipe.model)
    # The engine copies the weights into its own fused buffers: build it before adapters exist.
    engine = Engine(model, tokenizer, dtype=engine_dtype, max_batch=_max_batch(recipe), show_progress=False)
    trainer = TrainerRole(model, *_trainer_args(recipe, tokenizer))
    # safety: the reward's Lagrangian multiplier moves once per step
    return Roles(env, Inference(engine), trainer, attach(env), tokenizer)


def ray_roles(recipe: RLRecipe, env: Environment, engine_dtype: str) -> Roles:
    """Trainer, Inference and Environment as Ray actors; the driver keeps only the tokenizer."""
    m, dtype = recipe.model, session.master_dtype(recipe.model)
    tokenizer = load_tokenizer(m.name, for_batching=True)
    remote_env, inference = ray_backend.start(env, m.name, m.seed, dtype, engine_dtype, _max_batch(recipe))
    trainer = ray_backend.start_trainer(m.name, m.seed, dtype, *_trainer_args(recipe, tokenizer))
    return Roles(remote_env, inference, trainer, remote_env.dual, tokenizer,
                 stop=lambda: ray_backend.stop(remote_env, inference, trainer))


def _max_batch(recipe: RLRecipe) -> int:
    return max(recipe.rl.prompts_per_step * recipe.rl.group, 1)


def _trainer_args(recipe: RLRecipe, tokenizer: Any) -> tuple:
    """(cfg, temperature, pad id, max policy tokens per episode) for `TrainerRole`."""
    return (recipe.rl, recipe.sampling.temperature, tokenizer.pad_token_id or 0,
            recipe.sampling.max_tokens * recipe.env.max_turns)
