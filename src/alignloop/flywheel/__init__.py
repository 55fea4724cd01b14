"""One command for the whole loop: logs -> filter -> build -> SFT -> reward models -> RL -> eval -> A/B -> report."""
