"""`python -m alignloop.cli ...` (what torchrun runs: `torchrun ... -m alignloop.cli train sft RECIPE`)."""

from alignloop.cli import main

main()
