"""`ray job submit --working-dir . -- python jobs/sweep.py CONFIG.yaml [key=value ...]` (or `--resume RUN_DIR`).

The same function as `vemscale sweep`: the trials run on the cluster the job runs on (RAY_ADDRESS, set by the
job server); the last stdout line is the report as JSON. Exit 0 when every trial finished, 1 when any trial
failed (the report lists them; `--resume` reruns them), 2 on bad input.
"""

import sys

from vemscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:], "--json"]))
