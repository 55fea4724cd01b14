"""The roles an RL run drives, built once: in this process (`local`) or as Ray actors (`ray`).

Either way the step loop gets the same `Roles`: `env` and `inference` for `play()`, `trainer`
(step, weights, checkpoints, the final model), `dual` (the reward's safety multiplier, or None),
and the driver's `tokenizer`. Used as a context manager, the roles are stopped on the way out
(the Ray actors ended; nothing to do locally).

Rollouts come from our engine or, locally, from vLLM in this process (`rl.inference`; see
`inference_backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignloop.engine import vllm_backend
from alignloop.engine.api import InferenceEngine
from alignloop.engine.engine import Engine
from alignloop.errors import AlignloopError
from alignloop.models import load_tokenizer, resolve_model
from alignloop.rl import ray_backend
from alignloop.rl.config import RLRecipe
from alignloop.rl.env import Environment
from alignloop.rl.inference import Inference
from alignloop.rl.safety import StepDual, attach
from alignloop.rl.trainer import TrainerRole
from alignloop.train import session
from alignloop.train.moe_balance import has_moe


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
    engine = make_engine(recipe, model, tokenizer, engine_dtype)
    trainer = TrainerRole(model, *_trainer_args(recipe, tokenizer))
    # safety: the reward's Lagrangian multiplier moves once per step
    return Roles(env, Inference(engine), trainer, attach(env), tokenizer)


def ray_roles(recipe: RLRecipe, env: Environment, engine_dtype: str) -> Roles:
    """Trainer, Inference and Environment as Ray actors; the driver keeps only the tokenizer."""
    if recipe.rl.inference == "vllm":
        raise AlignloopError("rl.inference = 'vllm' runs with --backend local (vLLM in the driver's process); "
                             "with --backend ray rollouts come from our engine")
    m, dtype = recipe.model, session.master_dtype(recipe.model)
    tokenizer = load_tokenizer(m.name, for_batching=True)
    remote_env, inference = ray_backend.start(env, m.name, m.seed, dtype, engine_dtype, _max_batch(recipe))
    trainer = ray_backend.start_trainer(m.name, m.seed, dtype, *_trainer_args(recipe, tokenizer))
    return Roles(remote_env, inference, trainer, remote_env.dual, tokenizer,
                 stop=lambda: ray_backend.stop(remote_env, inference, trainer))


def inference_backend(choice: str, model: str) -> str:
    """"engine" or "vllm" for a recipe's `rl.inference`; "auto" is vLLM where a CUDA GPU is present,
    vLLM imports and `model` is a checkpoint vLLM can load (not a preset built in memory), else our engine."""
    if choice == "auto":
        # cuda first: on a CPU machine, no 30-second vLLM import just to decide against it
        gpu = torch.cuda.is_available() and isinstance(resolve_model(model), Path)
        return "vllm" if gpu and vllm_backend.import_problem() is None else "engine"
    return choice


def make_engine(recipe: RLRecipe, model: Any, tokenizer: Any, engine_dtype: str) -> InferenceEngine:
    """The rollout engine `recipe` asks for, holding `model`'s weights (vLLM loads the same checkpoint)."""
    if inference_backend(recipe.rl.inference, recipe.model.name) == "vllm":
        vllm_backend.require_vllm()
        return vllm_backend.VllmEngine(vllm_backend.checkpoint_folder(recipe.model.name), dtype=engine_dtype,
                                       max_batch=_max_batch(recipe), max_len=recipe.rl.max_context,
                                       seed=recipe.rl.seed)
    return Engine(model, tokenizer, dtype=engine_dtype, max_batch=_max_batch(recipe), show_progress=False,
                  record_routing=(recipe.rl.routing_replay or recipe.rl.replay_check) and has_moe(model))


def _max_batch(recipe: RLRecipe) -> int:
    return max(recipe.rl.prompts_per_step * recipe.rl.group, 1)


def _trainer_args(recipe: RLRecipe, tokenizer: Any) -> tuple:
    """(cfg, temperature, pad id, max policy tokens per episode) for `TrainerRole`."""
    return (recipe.rl, recipe.sampling.temperature, tokenizer.pad_token_id or 0,
            recipe.sampling.max_tokens * recipe.env.max_turns)
