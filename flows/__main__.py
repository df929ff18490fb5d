"""`python -m flows ...` is `vbf run ...` (kept as an alias)."""

import sys

from flows.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
