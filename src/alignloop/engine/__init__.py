"""Generation: one interface (`api.InferenceEngine`), a fast local CPU engine, a vLLM backend later."""

from alignloop.engine.api import Completion, InferenceEngine, SamplingParams

__all__ = ["Completion", "InferenceEngine", "SamplingParams"]
