"""Chat templates: exact rendering, family knowledge, assistant masks, parsing, lint, token costs."""
