"""``python -m tcpade ...``: the same command line as the ``tcpade`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
