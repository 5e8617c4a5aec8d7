"""Data quality: rules from the dataset spec, the Great Expectations runner, the quarantine split."""
