"""The `transformers.Trainer` integration (layer 5): the trainer that composes a `Pruner`, its checkpointing and
saving hooks, and the offline accuracy metrics."""
