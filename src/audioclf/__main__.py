"""`python -m audioclf [overrides]`: the same Hydra app as `python main.py` and `audioclf`."""

from audioclf.cli import main

main()
