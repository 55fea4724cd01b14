"""Trainers: one loop (`loop`), its schedules and checkpoints, and the trainers built on it (`sft`).

Imports stay lazy here: `import alignloop.train` must not pull in torch for the CLI's --help.
"""
