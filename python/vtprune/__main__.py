"""``python -m vtprune``: the same command line as the ``vtprune`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
