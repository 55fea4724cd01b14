"""User logs, from the tables a chat product records to the datasets training reads.

`schema` (the log tables, their row models and `conform`), `io` (folders of tables, Parquet or
JSONL), `labels` (what happened after each answer, derived from the logs alone), `ingest` (rows
from JSONL or Parquet into one conformed folder, bad rows quarantined), `adapters` (public
conversation datasets as logs), `parts` (user partitions, in memory or on disk), `filters`
(bots, skimmers, repeats, quality, diversity, per-user cap), `builders` (SFT, DPO, reward-model,
distillation and RL sets; their schemas and recipe section in `build_config`, the files and report
in `dataset_writer`), `ray_engine` (filters and builders on Ray Data, same outputs),
`neardup` and `stablehash` (their helpers), `config` and `stage` (the ingest, filter and build
stages of a run).
"""

from alignloop.data.io import TableWriter, read_logs, read_table, read_tables, write_logs, write_tables
from alignloop.data.labels import derive_labels
from alignloop.data.schema import (
    DERIVED_SCHEMAS,
    EVENT_TYPES,
    LOG_SCHEMAS,
    ROLES,
    ROW_MODELS,
    SCHEMAS,
    Conversation,
    Event,
    Label,
    SchemaError,
    Session,
    Turn,
    User,
    conform,
    rows_to_table,
    table_to_rows,
)

__all__ = [
    "DERIVED_SCHEMAS", "EVENT_TYPES", "LOG_SCHEMAS", "ROLES", "ROW_MODELS", "SCHEMAS",
    "Conversation", "Event", "Label", "SchemaError", "Session", "TableWriter", "Turn", "User",
    "conform", "derive_labels", "read_logs", "read_table", "read_tables", "rows_to_table", "table_to_rows",
    "write_logs", "write_tables",
]
