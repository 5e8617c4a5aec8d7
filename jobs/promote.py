"""Job task: promote (a thin entry over tenantml.pipeline; see libs/tenantml/jobs.py)."""

import sys

from tenantml.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main("promote", sys.argv[1:]))
