"""What the filters did: one `FilterReport` per filter, gathered in a `FunnelReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from alignloop.data.filters.base import DROPPED, Filter

# --- reports -----------------------------------------------------------------------------------


@dataclass
class FilterReport:
    """What one filter did: items in, kept, dropped (kept + dropped == input, always)."""

    name: str
    unit: str
    input: int
    kept: int
    dropped: int
    weighted: int = 0  # kept, but down-weighted
    reasons: dict[str, int] = field(default_factory=dict)
    rows_before: dict[str, int] = field(default_factory=dict)
    rows_after: dict[str, int] = field(default_factory=dict)
    out_of_scope: dict[str, int] = field(default_factory=dict)  # per rule: items it does not apply to
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class FunnelReport:
    """Every filter's report, in order, plus each dropped item with its reason."""

    input_rows: dict[str, int]
    output_rows: dict[str, int]
    filters: list[FilterReport] = field(default_factory=list)
    dropped: pl.DataFrame = field(default_factory=lambda: pl.from_arrow(DROPPED.empty_table()))
    inputs: dict[str, pl.DataFrame] = field(default_factory=dict)  # per filter: the items it judged (id, user_id)
    seconds: float = 0.0

    def __getitem__(self, name: str) -> FilterReport:
        for f in self.filters:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"input_rows": self.input_rows, "output_rows": self.output_rows, "seconds": round(self.seconds, 3),
                "filters": [f.to_dict() for f in self.filters]}

    def summary(self) -> str:
        lines = [f"{'filter':<12} {'unit':<14} {'input':>9} {'kept':>9} {'dropped':>8}  reasons"]
        for f in self.filters:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(f.reasons.items(), key=lambda kv: -kv[1]))
            extra = f" (down-weighted {f.weighted})" if f.weighted else ""
            if any(f.out_of_scope.values()):
                extra += "; out of scope: " + ", ".join(f"{k} {v}" for k, v in f.out_of_scope.items() if v)
            lines.append(f"{f.name:<12} {f.unit:<14} {f.input:>9} {f.kept:>9} {f.dropped:>8}  {reasons}{extra}")
        return "\n".join(lines)



def filter_report(flt: Filter, n_items: int, decisions: pl.DataFrame, before: dict[str, int],
                   after: dict[str, int], seconds: float, out_of_scope: dict[str, int] | None = None
                   ) -> FilterReport:
    weighted = flt.name == "user_cap" and flt.config.mode == "weight"
    n_dec = decisions.select(pl.col("id").n_unique()).item() if decisions.height else 0
    reasons = dict(decisions.group_by("reason").len().sort("reason").iter_rows()) if decisions.height else {}
    dropped = 0 if weighted else n_dec
    return FilterReport(name=flt.name, unit=flt.unit, input=n_items, kept=n_items - dropped,
                        dropped=dropped, weighted=n_dec if weighted else 0, reasons=reasons,
                        rows_before=before, rows_after=after, out_of_scope=dict(out_of_scope or {}),
                        seconds=round(seconds, 4))


def dropped_rows(flt: Filter, decisions: pl.DataFrame) -> pl.DataFrame:
    weight = pl.col("weight") if "weight" in decisions.columns else pl.lit(None, pl.Float64)
    out = decisions.select(filter=pl.lit(flt.name), unit=pl.lit(flt.unit), id="id", user_id="user_id",
                           reason="reason", weight=weight.cast(pl.Float64))
    return out.cast({"filter": pl.String, "unit": pl.String})


