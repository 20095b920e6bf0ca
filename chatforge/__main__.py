"""`python -m chatforge ...` and `torchrun --nproc_per_node=N -m chatforge train ...`: the same CLI."""

import sys

from chatforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
