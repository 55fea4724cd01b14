"""User logs: the schema (`schema`), folders of tables (`io`), derived labels (`labels`).

Later stages build on these: ingest with quarantine, filters, dataset builders (see issue 4).
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
