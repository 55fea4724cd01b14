"""Adapters: real external conversation datasets and chat exports turned into the log tables of
`alignloop.data.schema`.

    chitchat   the Chit Chat Challenge dataset (a package), converted whole into a log folder
    openai     OpenAI-format chat exports (JSONL / JSON: `messages`, with thumbs and alternatives)
    sharegpt   ShareGPT dumps (JSONL / JSON: `conversations` of `from` / `value`)
    table      the same as tables: Parquet, or a `datasets` dataset saved to disk
    records    what the export adapters share: a neutral conversation and its log rows
    detect     which adapter reads an input (`alignloop logs ingest --format`)
"""
