"""The pipeline's steps, one file each, declared with `@step` (see `steps/base.py`) and run by
`steps/runner.py`. Jobs, the CLI, notebooks and workflow tasks all run them through `run_step`."""
