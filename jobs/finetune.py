"""`ray job submit ... -- python jobs/finetune.py CONFIG.yaml [key=value ...]`: the finetune stage as a Ray job.

Connects to the cluster the job runs on (RAY_ADDRESS, set by the job server) and exits non-zero when the
work failed, so a blocking `ray job submit` reports the failure.
"""

import sys

from vemscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:], "--json"]))
