"""The agent environment: coding tasks played in sandboxes, for tool-use RL.

`sandbox` (bubblewrap: one isolated, stateful machine per episode, snapshot and restore; the
agent inside is `agent_main`), `limits` (what a sandbox may use; the errors), `tasks` (small
repositories with failing tests, generated from a seed), `tools` (JSON schemas, the system prompt,
parallel calls), `search` (MiniLM semantic search), `episodes` (reset / step / close over a batch),
`server` and `client` (the same over HTTP), `bench` (start and call latencies). It imports no RL:
`alignloop.rl.agent_env` adapts it to the RL loop's Environment.
"""
