"""A simulated user world with hidden ground truth, so every later stage can be measured, not just run.

`lexicon` (the world's language), `traits` (users and characters), `messages` (users write),
`engagement` (the ground-truth engagement function and behaviour), `responder` (the deployed
model), `world` (`simulate`), `truth` (ground-truth tables), `config` (recipe sections),
`stage` (`alignloop logs simulate`).
"""

from alignloop.sim.config import SimConfig, SimulateRecipe
from alignloop.sim.world import describe_world, simulate, simulate_blocks

__all__ = ["SimConfig", "SimulateRecipe", "describe_world", "simulate", "simulate_blocks"]
