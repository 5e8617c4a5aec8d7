"""Model store (Delta) + MLflow tracking and registry; champions are MLflow aliases."""
