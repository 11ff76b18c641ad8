"""One module per workflow; deterministic code only."""
