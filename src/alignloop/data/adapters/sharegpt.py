"""ShareGPT-style conversation dumps (JSONL, or a JSON array) as log tables.

The source: one conversation per record, its messages under `conversations` as `from` / `value`
pairs, as ShareGPT scrapes and the fine-tuning sets built from them store them:

    {"id": "QWJhYvA_0", "system": "You are a helpful assistant.",
     "conversations": [{"from": "human", "value": "Summarize this article ..."},
                       {"from": "gpt", "value": "The article argues ..."}]}

How it maps onto the schema (`alignloop.data.adapters.records` has the rules every format shares):

| source field | schema field | when missing |
|---|---|---|
| `id` or `conversation_id` | `conversations.conversation_id`, as given | "sharegpt-c-" + sha256 of the record |
| `system` (top level) | `conversations.system_prompt`, before any leading system messages | "" |
| `conversations[i].from`: `human` / `user` | `turns.role` user | required |
| `conversations[i].from`: `gpt` / `assistant` / `chatgpt` / `bard` / `bing` | `turns.role` assistant | required |
| `conversations[i].from`: `system` (leading only) | `conversations.system_prompt` (joined by blank lines) | "" |
| `conversations[i].value` | `turns.text` | required |
| `user_id` / `user`, `created_at` / `timestamp`, `model`, and per message `timestamp` / `created_at`, `feedback`, `thumbs`, `alternatives`, `selected_index` | as in the OpenAI format (`alignloop.data.adapters.openai`) | as there |

ShareGPT dumps carry no users, times or feedback: each conversation gets a user of its own, every
time is 2000-01-01T00:00:00Z plus one second per message, and there are no votes or swipes, so such
logs feed SFT on every selected answer but make no preference pairs.
A record is quarantined, with its reason, when it is not JSON, has no `conversations`, a `from`
outside those above (function calls, observations), or a conversation that does not run user,
assistant, user, ... after its system messages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from alignloop.data.adapters.openai import ChatFields, MessageFields
from alignloop.data.adapters.records import Chat

FORMAT = "sharegpt"

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "system": "system"}

Speaker = Literal["human", "user", "gpt", "assistant", "chatgpt", "bard", "bing", "system"]


class ShareGPTMessage(MessageFields):
    from_: Speaker = Field(alias="from")
    value: str


class ShareGPTRecord(ChatFields):
    system: str | None = None
    conversations: list[ShareGPTMessage] = Field(min_length=1)


def parse(data: Any) -> Chat:
    """One record as a `Chat`; raises pydantic's `ValidationError` or `RecordError` with the reason."""
    record = ShareGPTRecord.model_validate(data)
    system = (record.system,) if record.system else ()
    return record.chat([m.message(ROLES[m.from_], m.value) for m in record.conversations], "conversations", system)
