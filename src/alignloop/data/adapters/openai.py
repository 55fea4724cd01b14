"""OpenAI-format chat exports (JSONL, or a JSON array) as log tables.

The source: one conversation per line, the messages in the form of OpenAI's chat API, plus what a
product would export beside them. Only `messages` is required; unknown keys are ignored (exports
carry ids, titles, usage, ... that the logs have no place for):

    {"id": "c-17", "user_id": "acct-9", "created_at": "2026-01-05T09:30:00Z", "model": "my-model-v3",
     "messages": [
       {"role": "system", "content": "You are Captain Rook, a pirate."},
       {"role": "user", "content": "Ahoy!", "timestamp": 1767605400},
       {"role": "assistant", "content": "Arr, welcome aboard!", "feedback": {"rating": 1},
        "alternatives": ["Who goes there?", "Ahoy, landlubber."], "selected_index": 1},
       {"role": "user", "content": [{"type": "text", "text": "Where are we sailing?"}]},
       {"role": "assistant", "content": "To Tortuga.", "thumbs": "down"}]}

How it maps onto the schema (`alignloop.data.adapters.records` has the rules every format shares):

| source field | schema field | when missing |
|---|---|---|
| `id` or `conversation_id` (string or integer) | `conversations.conversation_id`, as given | "openai-c-" + sha256 of the record |
| `user_id` or `user` | `users.user_id` = "ex-u-" + salted sha256 | a user of its own per conversation |
| `created_at` or `timestamp` (conversation) | `conversations.started_at`, `sessions.started_at` | the first message's time, else 2000-01-01T00:00:00Z |
| `model` | `conversations.model_version` | "unknown" |
| leading `system` messages | `conversations.system_prompt` (joined by blank lines); `character_id` = "ex-ch-" + its hash | "" |
| `messages[i].role` user / assistant | `turns.role`, a chain user, assistant, user, ... | required |
| `messages[i].content`: a string, or text parts `[{"type": "text", "text": ...}]` | `turns.text` (parts joined by newlines) | required |
| `messages[i].timestamp` or `created_at` | `turns.created_at`, the message's events' `timestamp` | 1 s after the message before (the first: the conversation's start) |
| `messages[i].alternatives` (assistant; strings or text parts) | sibling `turns` (candidates, all `shown`), a `swipe` event from each to the next, a `select` event on `content` | no swipes: one candidate |
| `messages[i].selected_index` | `turns.candidate_index` of `content` among all candidates in shown order (the others keep their order around it) | `len(alternatives)`: the last one shown |
| `messages[i].feedback.rating` 1 / -1 / 0, or `thumbs` "up" / "down" | a `vote` event +1 / -1 / 0 on the selected candidate | no vote |

Timestamps are ISO 8601 (naive: UTC) or unix seconds (numbers above 2e10 are milliseconds, as
pydantic reads them). A record is quarantined, with its reason, when it is not JSON, has no
`messages`, a role other than system / user / assistant (tool calls), content that is not text,
system messages after the conversation began, two user or two assistant messages in a row, or a
first message from the assistant (the builders read a conversation as user, assistant, user, ...),
feedback on a user message, or a `feedback` and `thumbs` that disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, model_validator

from alignloop.data.adapters.records import Chat, Message, to_utc

FORMAT = "openai"

THUMBS = {"up": 1, "down": -1}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Part(_Lenient):
    type: str
    text: str | None = None


def text_of(content: str | list[Part]) -> str:
    if isinstance(content, str):
        return content
    for part in content:
        if part.type != "text" or part.text is None:
            raise ValueError(f"only text parts can be logged, got a '{part.type}' part")
    return "\n".join(part.text or "" for part in content)


Content = Annotated[str | list[Part], AfterValidator(text_of)]
"""a message's text: a string, or OpenAI's list of parts (text parts only), read as a string"""


class Feedback(_Lenient):
    rating: Literal[1, -1, 0]


class MessageFields(_Lenient):
    """What a product exports beside a message's role and content (shared with ShareGPT)."""

    timestamp: datetime | None = Field(None, validation_alias=AliasChoices("timestamp", "created_at"))
    feedback: Feedback | None = None
    thumbs: Literal["up", "down"] | None = None
    alternatives: list[Content] | None = None
    selected_index: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_vote(self) -> MessageFields:
        if self.feedback is not None and self.thumbs is not None and self.feedback.rating != THUMBS[self.thumbs]:
            raise ValueError(f"feedback.rating {self.feedback.rating} and thumbs '{self.thumbs}' disagree")
        return self

    def message(self, role: str, text: str) -> Message:
        vote = self.feedback.rating if self.feedback is not None else THUMBS.get(self.thumbs or "")
        return Message(role=role, text=text, at=to_utc(self.timestamp), alternatives=tuple(self.alternatives or ()),
                       selected_index=self.selected_index, vote=vote)


class ChatFields(_Lenient):
    """What a product exports beside a conversation's messages (shared with ShareGPT)."""

    id: str | int | None = Field(None, validation_alias=AliasChoices("id", "conversation_id"))
    user_id: str | int | None = Field(None, validation_alias=AliasChoices("user_id", "user"))
    created_at: datetime | None = Field(None, validation_alias=AliasChoices("created_at", "timestamp"))
    model: str | None = None

    def chat(self, messages: list[Message], where: str, system: tuple[str, ...] = ()) -> Chat:
        return Chat(messages=tuple(messages), conversation_id=None if self.id is None else str(self.id),
                    user_id=None if self.user_id is None else str(self.user_id), started_at=to_utc(self.created_at),
                    model=self.model, system=system, where=where)


class OpenAIMessage(MessageFields):
    role: Literal["system", "user", "assistant"]
    content: Content


class OpenAIRecord(ChatFields):
    messages: list[OpenAIMessage] = Field(min_length=1)


def parse(data: Any) -> Chat:
    """One record (a parsed JSON object, or a table row as a dict) as a `Chat`; raises pydantic's
    `ValidationError` or `RecordError` with the reason."""
    record = OpenAIRecord.model_validate(data)
    return record.chat([m.message(m.role, m.content) for m in record.messages], "messages")
