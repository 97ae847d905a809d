"""``python -m tcpade ...``: the same command line as the ``tcpade`` console script."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
