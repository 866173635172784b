"""``python -m bmc ...``: the same as the ``bmc`` command."""

import sys

from bmc.cli import main

if __name__ == "__main__":
    sys.exit(main())
