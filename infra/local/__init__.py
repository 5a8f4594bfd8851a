"""The team stack on one machine, no container engine: `python -m infra.local.stack up|status|down`."""
