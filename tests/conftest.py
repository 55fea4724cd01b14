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
