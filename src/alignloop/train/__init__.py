"""Trainers: SFT, DPO (IPO, SimPO) and distillation, on one loop and one skeleton.

- `stage`: `run_sft`, `run_dpo`, `run_distill`, the stages `alignloop train ...` runs;
  `config`: their recipes and the shared `TrainSection`.
- `session`: the skeleton every trainer follows (open the stage, load, make trainable, train,
  finish); `loop`: the training loop; `checkpoint`: exact kill-and-resume; `metrics`: the
  per-step log and the optional experiment trackers; `schedule`, `lora`, `dist` (torchrun:
  DDP, FSDP2), `threads`.
- `sft`, `dpo`, `distill`: each trainer's objective and batches; `sft_data`, `dpo_data`,
  `packing`, `rows`, `logprobs`, `context`, `cache`: the data and the forward passes under them.

This file imports nothing, so importing one of them does not load the others.
"""
