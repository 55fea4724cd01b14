"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

One checkpoint is one folder `checkpoints/step-000040/`:

    trainable.safetensors   the trainable parameters (all of them for full fine-tuning, only the
                            adapters for LoRA: frozen weights come back from the base model)
    buffers.safetensors     buffers that training moves without a gradient (an MoE router's
                            balancing bias: a module lists them in `trained_buffers`); absent when none
    optimizer.safetensors   the optimizer state flattened to tensors `state.<i>.<key>`; the param
                            groups (hyper-parameters) and any non-tensor state ride along as JSON
                            in the file's metadata
    rng.safetensors         the torch CPU (and CUDA) generator states and numpy's key array
    trainer_state.json      step, data position, scheduler state, python/numpy RNG scalars,
                            running totals, and the hash of the config it belongs to

The folder is written under a hidden temporary name and renamed into place once every file is
on disk, so a SIGKILL at any moment leaves either the whole checkpoint or none of it; a full disk
is one line (`DiskFullError`) naming the folder and the checkpoint that is still intact. safetensors
(not pickle) means a checkpoint can be read without running code from it.

Under torchrun (see `dist`), saving and loading are collective: every process calls them. Sharded
(FSDP2, expert-parallel) weights and optimizer moments are gathered into full tensors and rank 0 alone writes the
files above, with every process's RNG state (`rank<r>.`-prefixed tensors, `rng_ranks` in
trainer_state.json); on load every process reads the full tensors and keeps its own shard. So a
checkpoint is the same whatever the number of processes or the strategy, and resumes under any.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from alignloop.runs import METRICS, DiskFullError, Stage, disk_full_is_an_error, trim_jsonl
from alignloop.train import dist
from alignloop.ui import say

STEP_DIR = re.compile(r"^step-(\d+)$")
_META_KEY = "alignloop"  # safetensors metadata is str -> str: our JSON goes under one key


# --- what gets saved ---------------------------------------------------------------------------


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor for every parameter that trains (shared/tied ones appear once).

    Shards are gathered into full tensors: collective under FSDP2 (every process must call it).
    """
    return {name: dist.full_tensor(p).contiguous() for name, p in dist.unwrap(module).named_parameters()
            if p.requires_grad}


def trained_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> buffer for every buffer a module declares in `trained_buffers` (e.g. a router's bias)."""
    out = {}
    for prefix, sub in dist.unwrap(module).named_modules():
        for name in getattr(sub, "trained_buffers", ()):
            out[f"{prefix}.{name}" if prefix else name] = getattr(sub, name)
    return out


def optimizer_param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own numbering (param-group order)."""
    name_of = {id(p): name for name, p in dist.unwrap(module).named_parameters()}
    return [name_of.get(id(p), "?") for group in optimizer.param_groups for p in group["params"]]


def flatten_optimizer(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state_dict as (tensors, JSON metadata).

    torch numbers parameters 0..n-1 in param-group order; their `names` in that order are stored
    too, so a resume with a differently built model fails loudly instead of mixing up moments.
    """
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the moments' owners
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    # Sorted: under FSDP2 each full_tensor is a collective, so all processes must go in one order.
    for index in sorted(sd["state"]):
        state = sd["state"][index]
        for key in sorted(state):
            value = state[key]
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = dist.full_tensor(value, like=params[index]).contiguous()
            else:
                other.setdefault(str(index), {})[key] = value
    meta = {"param_groups": sd["param_groups"], "non_tensor_state": other, "param_names": names}
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                        params: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """The optimizer state_dict back; with `params` (optimizer order), moments are laid out like them
    (this process's shard of a full moment when its parameter is an FSDP2 DTensor)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        i = int(index)
        if params is not None and dist.is_sharded(params[i]) and value.shape == dist.full_shape(params[i]):
            value = dist.shard_like(value, params[i])
        state.setdefault(i, {})[name] = value
    for index, values in meta["non_tensor_state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists; AdamW unpacks betas either way, but be exact
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every generator a training step may draw from (dropout, shuffles in user code)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors, key=_cuda_index) if k.startswith("torch_cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _cuda_index(key: str) -> int:
    return int(key.rsplit(".", 1)[1]) if key.startswith("torch_cuda.") else -1


# --- writing and finding checkpoints -----------------------------------------------------------


def save_checkpoint(
    root: str | Path,
    step: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` atomically; keep only the newest `keep` ones.

    Collective under torchrun: every process calls it, rank 0 writes (the others return the path).
    """
    root = Path(root)
    final = root / f"step-{step:06d}"
    # Gather first, on every process (collectives under FSDP2), then only rank 0 touches the disk.
    dist.reshard(module)
    weights = trainable_state(module)
    buffers = {name: b.detach().cpu().contiguous() for name, b in trained_buffers(module).items()}
    opt_tensors, opt_meta = flatten_optimizer(optimizer, optimizer_param_names(module, optimizer))
    rng_tensors, rng_meta = rng_state()
    per_rank = dist.gather_objects((rng_tensors, rng_meta))
    if not dist.is_main():
        dist.barrier()
        return final
    rng_ranks = [rng_meta]
    for r, (tensors_r, meta_r) in enumerate(per_rank[1:], start=1):
        rng_tensors.update({f"rank{r}.{k}": v for k, v in tensors_r.items()})
        rng_ranks.append(meta_r)
    state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(), "rng": rng_meta}
    if len(rng_ranks) > 1:
        state["rng_ranks"] = rng_ranks
    tmp = root / f".step-{step:06d}.{secrets.token_hex(4)}.tmp"
    try:
        with disk_full_is_an_error_here(final):
            root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            save_file(weights, tmp / "trainable.safetensors")
            if buffers:
                save_file(buffers, tmp / "buffers.safetensors")
            save_file(opt_tensors, tmp / "optimizer.safetensors", metadata={_META_KEY: json.dumps(opt_meta)})
            save_file(rng_tensors, tmp / "rng.safetensors")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
            for f in tmp.iterdir():
                _fsync(f)
            if final.exists():  # a rerun of the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(root)  # make the rename itself durable
    except DiskFullError as e:
        raise DiskFullError(f"{e}; {what_is_intact(root)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune(root, keep)
    dist.barrier()
    return final


@contextlib.contextmanager
def disk_full_is_an_error_here(path: str | Path) -> Iterator[None]:
    """`runs.disk_full_is_an_error` that also knows safetensors' way of saying the disk is full.

    Its Rust writer raises a `SafetensorError`, not an OSError, with the OS error in the message
    only ("... No space left on device (os error 28)"; a full quota is os error 122).
    """
    with disk_full_is_an_error(path):
        try:
            yield
        except SafetensorError as e:
            if "No space left on device" in str(e) or "(os error 122)" in str(e):
                raise OSError(errno.ENOSPC, str(e)) from None
            raise


def what_is_intact(root: str | Path) -> str:
    """The end of an error that stops a run: which checkpoint under `root` a rerun resumes from, truthfully."""
    latest = latest_checkpoint(root)
    if latest is None:
        return "no checkpoint was saved yet: a rerun starts from step 0"
    return f"the last checkpoint ({latest}) is intact"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first; temporary folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of writes that were killed."""
    root = Path(root)
    for _, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".step-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))


def resume(stage: Stage, load: Callable[[Path], dict[str, Any]], total_steps: int, *, label: str,
           logs: Sequence[str] = (METRICS,)) -> dict[str, Any]:
    """Continue a killed run: the trainer state of the newest checkpoint of this very config and inputs.

    `load(path)` restores that checkpoint into the caller's model, optimizer and scheduler (e.g.
    `load_checkpoint` bound to them) and returns its trainer state; `{"step": 0}` when there is
    none. Checkpoints of another config or other inputs (`Stage.work_hash`) are deleted, never
    resumed (their moments and weights were trained under other settings or on other data). The JSON-lines `logs` of the stage lose the steps past the
    resumed one, since those steps run again; afresh, they are emptied (a stale step-0 line too).

    Under torchrun every process calls it: rank 0 picks the checkpoint, every process loads it.
    """
    root = stage.path("checkpoints")
    latest = None
    if dist.is_main():
        latest = latest_checkpoint(root)
        if latest is not None and read_trainer_state(latest).get("config_hash") != stage.work_hash():
            say(f"[yellow]checkpoints in {root} belong to another config or other inputs: starting afresh[/]")
            shutil.rmtree(root, ignore_errors=True)
            latest = None
    latest = dist.broadcast_object(latest)
    state: dict[str, Any] = {"step": 0} if latest is None else load(latest)
    if latest is not None:
        say(f"{label}: resuming from {latest.name} ({state['step']}/{total_steps} steps done)")
    if dist.is_main():
        for name in logs:
            trim_jsonl(stage.path(name), state["step"] or -1)
    return state


def load_checkpoint(
    path: str | Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNGs from `path`; return the trainer state.

    Under torchrun every process calls it and reads the (full) files; each keeps its own shard
    and its own RNG state (rank 0's when the checkpoint was made by fewer processes).
    """
    path = Path(path)
    state = read_trainer_state(path)
    module = dist.unwrap(module)

    weights = load_file(path / "trainable.safetensors")
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"checkpoint {path} does not match the model's trainable parameters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            dist.copy_into(params[name], tensor)
        buffers = trained_buffers(module)
        if (path / "buffers.safetensors").exists():  # checkpoints of dense models have none
            saved = load_file(path / "buffers.safetensors")
            if set(saved) != set(buffers):
                raise ValueError(f"checkpoint {path} does not match the model's trained buffers "
                                 f"(saved {sorted(saved)[:3]}, model {sorted(buffers)[:3]})")
            for name, tensor in saved.items():
                buffers[name].copy_(tensor)

    with safe_open(path / "optimizer.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()[_META_KEY])
    if meta["param_names"] != optimizer_param_names(module, optimizer):
        raise ValueError(f"checkpoint {path}: optimizer state was saved for other parameters")
    in_order = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.load_state_dict(unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta, in_order))
    scheduler.load_state_dict(state["scheduler"])
    # Last: anything above that drew random numbers must not shift the restored streams.
    rng_tensors, rng_meta = load_file(path / "rng.safetensors"), state["rng"]
    rank = dist.context().rank
    if rank and rank < len(state.get("rng_ranks", ())):
        prefix = f"rank{rank}."
        rng_tensors = {k[len(prefix):]: v for k, v in rng_tensors.items() if k.startswith(prefix)}
        rng_meta = state["rng_ranks"][rank]
    else:
        rng_tensors = {k: v for k, v in rng_tensors.items() if not k.startswith("rank")}
    set_rng_state(rng_tensors, rng_meta)
    return state


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
