"""Tool schemas for the chat-template tests, in the OpenAI function format that `tools=` takes."""

from __future__ import annotations


def function_tool(name: str, description: str, properties: dict, required: list[str] | None = None) -> dict:
    """A function tool whose parameters are an object of `properties` (`required` ones listed, when given)."""
    parameters: dict = {"type": "object", "properties": properties}
    if required is not None:
        parameters["required"] = required
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}
