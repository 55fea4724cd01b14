"""Adapters: real external conversation datasets turned into the log tables of `alignloop.data.schema`."""
