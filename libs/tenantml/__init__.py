"""tenantml: multi-tenant batch ML on Spark, Delta Lake, MLflow and torch."""
__version__ = "0.1.0"
