"""Reward models from user signals (heads on a shared backbone) and one combined reward for RL.

`api.py` is the contract RL builds against; everything else here produces a `RewardFn`.
"""

from alignloop.rewards.api import RewardBatch, RewardFn, validated

__all__ = ["RewardBatch", "RewardFn", "validated"]
