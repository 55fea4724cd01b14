"""The 64 fixed chat prompts every model bench starts from (assets/bench_prompts.json)."""

from __future__ import annotations

import json
from importlib import resources


def bench_prompts() -> list[str]:
    return json.loads(resources.files("alignloop.assets").joinpath("bench_prompts.json").read_text())
