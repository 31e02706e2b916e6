"""Training: a run reads a dataset version's shards and writes safetensors checkpoints to the store."""
