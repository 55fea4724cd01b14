"""The filter stage's configuration (one section per filter) and the registry of filters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignloop.data.filters.base import Filter
from alignloop.data.filters.bots import BotConfig, BotFilter
from alignloop.data.filters.diversity import DiversityConfig, DiversityFilter
from alignloop.data.filters.min_reading import MinReadingConfig, MinReadingFilter
from alignloop.data.filters.quality import QualityConfig, QualityFilter
from alignloop.data.filters.repeats import RepeatConfig, RepeatFilter
from alignloop.data.filters.user_cap import UserCapConfig, UserCapFilter
from alignloop.recipes import Section

FilterName = Literal["quality", "bots", "min_reading", "repeats", "diversity", "user_cap"]
DEFAULT_ORDER: list[FilterName] = ["quality", "bots", "min_reading", "repeats", "diversity", "user_cap"]


class FilterConfig(Section):
    order: list[FilterName] = Field(default_factory=lambda: list(DEFAULT_ORDER))
    partitions: int = Field(0, ge=0, description="user partitions processed one at a time; 0 = auto (by size)")
    events_per_partition: int = Field(1_000_000, ge=1, description="auto partitions: about this many events each")
    quality: QualityConfig = QualityConfig()
    bots: BotConfig = BotConfig()
    min_reading: MinReadingConfig = MinReadingConfig()
    repeats: RepeatConfig = RepeatConfig()
    diversity: DiversityConfig = DiversityConfig()
    user_cap: UserCapConfig = UserCapConfig()

    @model_validator(mode="after")
    def _unique(self) -> FilterConfig:
        if len(set(self.order)) != len(self.order):
            raise ValueError("order names a filter twice")
        return self



FILTERS: dict[str, type[Filter]] = {
    f.name: f for f in (QualityFilter, BotFilter, MinReadingFilter, RepeatFilter, DiversityFilter, UserCapFilter)
}


def make_filters(config: FilterConfig) -> list[Filter]:
    """The enabled filters, in `config.order`."""
    out = []
    for name in config.order:
        section = getattr(config, name)
        if section.enabled:
            out.append(FILTERS[name](section))
    return out

