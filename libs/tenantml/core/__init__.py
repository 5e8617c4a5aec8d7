"""Pure rules imported by every layer: ids, errors, tenant policy, progress. Imports nothing above."""
