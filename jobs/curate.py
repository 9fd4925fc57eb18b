"""`ray job submit --working-dir . -- python jobs/curate.py [configs/curate.yaml] sources=... output=... [key=value ...]`.

The same function as `vemscale curate`; the exit code is non-zero when a pass failed (2 for bad input).
"""

import sys

from vemscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", *sys.argv[1:], "--json"]))
