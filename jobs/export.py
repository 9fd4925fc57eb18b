"""`ray job submit --working-dir . -- python jobs/export.py [configs/export.yaml] SRC DST [key=value ...] [--flags]`.

The same function as `vemscale export`; the exit code is non-zero when any task failed (2 for bad input).
"""

import sys

from vemscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:], "--json"]))
