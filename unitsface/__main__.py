"""`python -m unitsface` (also what `torchrun -m unitsface` runs)."""

from unitsface.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
