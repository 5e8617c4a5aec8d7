"""Job task: validate (a thin entry over tenantml.steps; see libs/tenantml/apps/jobs.py)."""

import sys

from tenantml.apps.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main("validate", sys.argv[1:]))
