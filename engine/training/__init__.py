"""Training: data loading from prepared shards, one trainer per model, checkpoints and curves."""
