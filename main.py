"""`python main.py [overrides]` from the repo root: the same Hydra app as the `audioclf` command."""

from audioclf.cli import main

if __name__ == "__main__":
    main()
