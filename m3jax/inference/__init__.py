"""Using a trained model: opening a checkpoint with its artifacts, and batched generation."""
