"""Gold tables for BI: the star schema's contracts and builders (written by the publish step)."""
