"""The functional core (layer 1): model-family adapters, prunable weights and exact masks, N:M patterns, scoring
criteria and the scoring pass, distillation losses, BatchNorm recalibration and mask enforcement. It imports nothing
else from the package."""
