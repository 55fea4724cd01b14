"""The product side: an OpenAI-compatible server, the chat UI, and the log store the flywheel reads."""
