"""Per-tenant training fan-out across Spark tasks, and the plan that balances it."""
