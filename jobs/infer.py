"""`ray job submit --working-dir . -- python jobs/infer.py [configs/infer.yaml] key=value ...`.

The same function as `vemscale infer`; the exit code is non-zero when any block failed (2 for bad input).
"""

import sys

from vemscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:], "--json"]))
