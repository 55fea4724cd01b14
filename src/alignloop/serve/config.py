"""The `alignloop serve` recipe: which model versions, how users split between them, where logs go, limits."""

from __future__ import annotations

from pydantic import Field, model_validator

from alignloop.recipes import Section


class ModelVersionSection(Section):
    version: str = Field(..., min_length=1, description="the name recorded on every conversation it answers")
    model: str = Field("smollm2-135m", description="zoo name or checkpoint folder")
    share: float = Field(1.0, gt=0, description="relative share of users assigned to it (stable hash of the user)")
    dtype: str = Field("auto", description="engine dtype: auto, float32 or bfloat16")
    seed: int = Field(0, description="init seed for tiny test presets")
    chat_family: str | None = Field(None, description="chat family for tool calls (e.g. qwen2.5); default: "
                                                       "detected from the model's chat template")


class GenerationSection(Section):
    max_tokens: int = Field(96, ge=1, le=4096, description="default answer length cap (product API and OpenAI API)")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)


class LimitsSection(Section):
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get 413")
    max_message_chars: int = Field(4000, ge=1, description="longest user message or edit text")
    max_events_per_request: int = Field(256, ge=1)
    max_n: int = Field(8, ge=1, description="most choices (swipes) per OpenAI request")
    requests_per_minute: int = Field(600, ge=1, description="per user (or key); 429 beyond")
    signups_per_minute: int = Field(60, ge=1, description="per client address")


class ServeSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0: any free port (printed)")
    store: str = Field("runs/serve/logs.db", description="SQLite file, or a postgresql:// URL")
    api_keys: list[str] = Field(default_factory=list,
                                description="static keys for the OpenAI API (beside the keys users sign up for)")
    ingest_keys: list[str] = Field(default_factory=list,
                                   description="keys that may post whole log rows to /api/logs (a trusted log "
                                               "producer, e.g. the simulated users); never a user's key")
    salt: str = Field("alignloop", description="salt of the user-id hash recorded in the logs")
    session_gap_s: float = Field(1800, gt=0, description="silence after which a user's next action starts a session")
    max_batch: int = Field(8, ge=1, description="requests decoded together by the engine loop")
    context: int = Field(2048, ge=16, description="prompt + answer tokens per request (the KV cache is sized once)")
    threads: int = Field(0, ge=0, description="torch threads for the engine loop; 0 = all cores")
    prefix_cache_mb: int = Field(1024, ge=0, description="keys/values of finished requests kept for later "
                                 "prompts that start the same way (a conversation's next exchange); 0 = off")


class ServeRecipe(Section):
    serve: ServeSection = ServeSection()
    models: list[ModelVersionSection] = Field(default_factory=lambda: [ModelVersionSection(version="base")],
                                              min_length=1)
    generation: GenerationSection = GenerationSection()
    limits: LimitsSection = LimitsSection()

    @model_validator(mode="after")
    def _versions_unique(self) -> ServeRecipe:
        names = [m.version for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model versions must be unique, got {names}")
        return self
