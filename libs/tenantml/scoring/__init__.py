"""Batch inference: each tenant's rows scored by its entitled champion, model loaded once per task."""
