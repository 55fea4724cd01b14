"""RL from rewards: Trainer, Inference and Environment roles, GRPO/PPO and their variants.

Data flows one way: an `Environment` poses tasks, `Inference` (the engine) answers them with the
current policy and keeps each token's log-prob, rewards and advantages are computed per episode,
and the `Trainer` takes one optimizer step and hands its weights back to Inference, in place.
"""
