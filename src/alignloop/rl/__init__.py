"""RL from rewards: Trainer, Inference and Environment roles, GRPO/PPO and their variants.

Data flows one way: an `Environment` poses tasks, `Inference` (the engine) answers them with the
current policy and keeps each token's log-prob, rewards and advantages are computed per episode,
and the `Trainer` takes one optimizer step and hands its weights back to Inference, in place.

The stage is `stage.run_rl` (recipes in `config`); `backend` builds the roles, in this process or
as Ray actors (`ray_backend`); each environment kind sits in its own module with its recipe
section (`arithmetic`, `reward_env`, `user_env`, `tool_env`).
"""
