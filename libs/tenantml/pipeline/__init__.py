"""Pipeline steps: each is ``step(ctx, dataset=..., tenants=...) -> StepResult``.

Jobs, the CLI, notebooks and workflow tasks all call these same functions.
"""

from tenantml.pipeline.ingest import ingest
from tenantml.pipeline.result import StepResult, TenantOutcome
from tenantml.pipeline.run import STEPS, run_pipeline, run_step
from tenantml.pipeline.score import score
from tenantml.pipeline.train import train
from tenantml.pipeline.validate import validate

__all__ = ["STEPS", "StepResult", "TenantOutcome", "ingest", "run_pipeline", "run_step", "score", "train",
           "validate"]
