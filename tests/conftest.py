"""Shared fixtures: models load once per session (SmolLM2 converts once into ALIGNLOOP_CACHE)."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2():
    from alignloop.models import load_model

    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def tiny():
    from alignloop.models import load_model

    return load_model("tiny-llama", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2():
    from alignloop.models import load_model

    return load_model("tiny-qwen2", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def small_world():
    """A small simulated world (logs, ground truth), simulated once for the log and simulator tests."""
    from alignloop.sim import SimConfig, simulate

    return simulate(SimConfig(users=400, days=6, seed=7, bot_fraction=0.05, skimmer_fraction=0.1))


@pytest.fixture(autouse=True)
def _loud_console():
    """`--quiet` in one CLI test must not silence output that a later test reads."""
    from alignloop.ui import set_quiet

    set_quiet(False)
    yield
    set_quiet(False)


@pytest.fixture
def one_thread():
    """A few-M-parameter model on a shared 2-core machine: one torch thread avoids barrier waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
