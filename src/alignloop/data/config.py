"""Recipes of the log pipeline's stages: one TOML (e.g. `recipes/logs.toml`) holds every stage's section.

Each stage reads and hashes its own section only, so changing `[build]` never re-runs the filters.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from alignloop.data.builders import BuildConfig
from alignloop.data.filters import FilterConfig
from alignloop.recipes import Section
from alignloop.sections import RunSection


class FilterSection(FilterConfig):
    source: str = Field("auto", description="auto (ingest/tables, else simulate/logs), ingest, simulate, or a folder")
    ground_truth: str = Field("auto", description="auto (simulate/ground_truth if present), none, or a folder")


class LogsRecipe(Section):
    """Every section of the log pipeline; each stage uses its own (others pass through unchecked here)."""

    run: RunSection = RunSection()
    simulate: dict[str, Any] = Field(default_factory=dict)
    output: dict[str, Any] = Field(default_factory=dict)
    ingest: dict[str, Any] = Field(default_factory=dict)
    filter: FilterSection = FilterSection()
    build: BuildConfig = BuildConfig()
