"""`--backend ray`: the Trainer, Inference and the Environment as three Ray actors; the driver
only passes messages between them (and keeps the tokenizer, metrics and files).

The roles keep their interfaces: `RemoteTrainer`, `RemoteInference` and `RemoteEnv` stand in for
`TrainerRole`, `Inference` and an `Environment`, forwarding each call to an actor (another
process, or another machine of a Ray cluster). Trainer and Inference each build the model from
the same zoo name and seed, so they start from the same weights; afterwards weights go from the
trainer actor to the inference actor as (name, tensor) lists through Ray's object store (the
driver hands over a reference, not the tensors), as in the local backend. Sampling seeds are per
request and counter-based, so a seeded run gives the same episodes as the local backend (tested
on the tiny model). `backend.ray_roles` builds the roles from here.

The Environment actor also holds the safety multiplier (`safety.attach`): the reward that reads
it lives there.
"""

from __future__ import annotations

from typing import Any

import torch

from alignloop.engine.engine import Engine
from alignloop.models import load_model
from alignloop.rl.inference import Inference
from alignloop.rl.safety import attach
from alignloop.rl.trainer import TrainerRole


def _ray() -> Any:
    import ray  # an optional extra: only `--backend ray` needs it, imported on first use

    return ray


def init(num_cpus: int | None = None) -> None:
    ray = _ray()
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


class InferenceWorker:
    def __init__(self, model: str, seed: int, dtype: str, engine_dtype: str, max_batch: int, threads: int) -> None:
        torch.set_num_threads(threads)
        weights, tokenizer = load_model(model, dtype=dtype, seed=seed)
        self.inference = Inference(Engine(weights, tokenizer, dtype=engine_dtype, max_batch=max_batch,
                                          show_progress=False))

    def generate(self, prompts, params):
        completions = self.inference.generate(prompts, params)
        return completions, self.inference.version, self.inference.sync_seconds

    def offer(self, weights: list[tuple[str, torch.Tensor]], version: int) -> None:
        self.inference.offer(weights, version)

    def apply_pending(self) -> tuple[int, float]:
        self.inference.apply_pending()
        return self.inference.version, self.inference.sync_seconds


class TrainerWorker:
    def __init__(self, model: str, seed: int, dtype: str, cfg: Any, temperature: float, pad_id: int,
                 max_tokens: int, threads: int) -> None:
        torch.set_num_threads(threads)
        weights, _ = load_model(model, dtype=dtype, seed=seed)
        self.role = TrainerRole(weights, cfg, temperature, pad_id, max_tokens)

    def call(self, method: str, *args):
        return getattr(self.role, method)(*args)


class _Proxy:
    """Forwards a role's method calls to the actor's `call(method, *args)` and waits for the answer."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def _call(self, method: str, *args):
        return _ray().get(self.actor.call.remote(method, *args))


class RemoteTrainer(_Proxy):
    """`TrainerRole`, run by an actor."""

    def step(self, trajectories):
        return self._call("step", trajectories)

    def weights(self):
        # A reference: Ray resolves it inside the inference actor, the tensors never visit the driver.
        return self.actor.call.remote("weights")

    def save_checkpoint(self, root, step: int, extra: dict, keep: int) -> None:
        self._call("save_checkpoint", root, step, extra, keep)

    def load_checkpoint(self, path) -> dict[str, Any]:
        return self._call("load_checkpoint", path)

    def save_policy(self, tokenizer, folder):
        return self._call("save_policy", tokenizer, folder)


class EnvWorker:
    def __init__(self, env: Any) -> None:
        self.env = env
        self.dual = attach(env)

    def call(self, method: str, *args):
        return getattr(self.env, method)(*args)

    def name(self) -> str:
        return self.env.name

    def dual_call(self, method: str, *args):
        return getattr(self.dual, method)(*args) if self.dual is not None else None

    def has_dual(self) -> bool:
        return self.dual is not None


class RemoteInference:
    """`Inference` for `play()`, run by an actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.version = 0
        self.sync_seconds = 0.0

    def generate(self, prompts, params):
        answer = self.actor.generate.remote(list(prompts), list(params))
        completions, self.version, self.sync_seconds = _ray().get(answer)
        return completions

    def offer(self, named, version: int) -> None:
        if not isinstance(named, _ray().ObjectRef):  # local tensors: copies, so later training can't race them
            named = [(n, t.detach().clone()) for n, t in named]
        _ray().get(self.actor.offer.remote(named, version))

    def apply_pending(self) -> None:
        self.version, self.sync_seconds = _ray().get(self.actor.apply_pending.remote())


class RemoteDual:
    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def _call(self, method: str, *args):
        return _ray().get(self.actor.dual_call.remote(method, *args))

    @property
    def value(self) -> float:
        return self._call("__getattribute__", "value")

    def set(self, value: float) -> None:
        self._call("set", value)

    def update(self) -> dict[str, float]:
        return self._call("update")


class RemoteEnv(_Proxy):
    """An `Environment` for `play()`, run by an actor."""

    def __init__(self, actor: Any) -> None:
        super().__init__(actor)
        self.name = _ray().get(actor.name.remote())
        self.dual = RemoteDual(actor) if _ray().get(actor.has_dual.remote()) else None

    def sample_tasks(self, n: int, seed: int):
        return self._call("sample_tasks", n, seed)

    def reset(self, tasks):
        return self._call("reset", tasks)

    def step(self, actions):
        return self._call("step", actions)


def _actor(cls: type, *args: Any) -> Any:
    # num_cpus=0: the three actors mostly take turns within a step, and reserving a core each would
    # keep them from being placed at all on a 2-core machine.
    init()
    return _ray().remote(num_cpus=0)(cls).remote(*args)


def start(env: Any, model: str, seed: int, dtype: str, engine_dtype: str, max_batch: int
          ) -> tuple[RemoteEnv, RemoteInference]:
    """Actors for the Environment and Inference; proxies with the local roles' interfaces."""
    threads = max(1, torch.get_num_threads())
    inference = _actor(InferenceWorker, model, seed, dtype, engine_dtype, max_batch, threads)
    return RemoteEnv(_actor(EnvWorker, env)), RemoteInference(inference)


def start_trainer(model: str, seed: int, dtype: str, cfg: Any, temperature: float, pad_id: int,
                  max_tokens: int) -> RemoteTrainer:
    """The Trainer actor: it loads the policy itself and keeps it, its optimizer and checkpoints."""
    threads = max(1, torch.get_num_threads())
    return RemoteTrainer(_actor(TrainerWorker, model, seed, dtype, cfg, temperature, pad_id, max_tokens, threads))


def stop(*roles: Any) -> None:
    """End the run's actors (the Ray runtime itself stays up for whoever started it)."""
    for role in roles:
        _ray().kill(role.actor)
