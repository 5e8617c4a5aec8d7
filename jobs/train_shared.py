"""Job task: train_shared (a thin entry over tenantml.steps; see libs/tenantml/apps/jobs.py)."""

import sys

from tenantml.apps.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main("train_shared", sys.argv[1:]))
