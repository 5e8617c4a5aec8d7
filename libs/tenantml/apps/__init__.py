"""What people and schedulers use: the CLI, job entry points, the run report, notebook helpers,
offboarding, governance SQL and the SQL endpoint. Read models over the steps; nothing imports them."""
