"""Pure reconciliation: observed children → next status and actions. No I/O."""
