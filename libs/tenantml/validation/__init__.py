"""Row-level data validation with Great Expectations (see :mod:`tenantml.validation.gx_rules`)."""

from tenantml.validation.gx_rules import Rule, RuleKind, RuleResult, build_suite, run_rules

__all__ = ["Rule", "RuleKind", "RuleResult", "build_suite", "run_rules"]
