"""`ray job submit --working-dir . -- python jobs/pretrain.py [configs/pretrain_retina.yaml] key=value ...`.

The same function as `vemscale pretrain`; exit 0 on success, 2 on bad input, 1 when training failed.
"""

import sys

from vemscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:], "--json"]))
