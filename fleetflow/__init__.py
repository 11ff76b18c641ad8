"""fleetflow kernel: settings, contracts, database, security, observability, Temporal client."""
