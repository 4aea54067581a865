"""The pruning state (layer 4, above `core`, `data`, `io` and `methods`): the settings (`config.py`) and the
`Pruner` that owns the method, the masks, the report and the checkpoint state."""
