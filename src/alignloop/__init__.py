"""alignloop: the alignment loop of a chat product, from user logs to a better model."""

__version__ = "0.1.0"
