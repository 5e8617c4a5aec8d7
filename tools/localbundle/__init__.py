"""The Databricks Asset Bundle in ``workflows/``, read, validated and run without a workspace.

- :mod:`~localbundle.bundle`: load ``databricks.yml`` + includes for a target, variables resolved;
- :mod:`~localbundle.validation`: offline checks (graph, entry points, parameters, config, cron);
- :mod:`~localbundle.runner`: run a job's tasks locally in dependency order, like a job run;
- :mod:`~localbundle.cli`: ``tenantml workflow run|validate``.
"""

from localbundle.bundle import Bundle, BundleError, ForEach, Job, Task, load_bundle
from localbundle.runner import JobRun, JobRunner, TaskRun, run_job
from localbundle.validation import Issue, bundle_schema_available, validate_bundle

__all__ = ["Bundle", "BundleError", "ForEach", "Issue", "Job", "JobRun", "JobRunner", "Task", "TaskRun",
           "bundle_schema_available", "load_bundle", "run_job", "validate_bundle"]
