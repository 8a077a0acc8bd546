"""``python -m usage_middleware``: the same as the ``usage-middleware`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
