"""Models: the offline zoo (real SmolLM2, tiny test presets, local folders, hub names)."""

from alignloop.models.zoo import KNOWN_MODELS, cache_dir, load_model, load_tokenizer, resolve_model

__all__ = ["KNOWN_MODELS", "cache_dir", "load_model", "load_tokenizer", "resolve_model"]
