"""`ray job submit --working-dir . -- python jobs/instances.py [configs/instances.yaml] source=... output=... [key=value ...]`.

The same function as `vemscale instances`; the exit code is non-zero when a pass failed (2 for bad input).
"""

import sys

from vemscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["instances", *sys.argv[1:], "--json"]))
