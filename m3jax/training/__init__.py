"""Both training stages: the optimizer, the pure train step, checkpoints and the loop."""
