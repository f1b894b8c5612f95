"""Evaluation with and without memory: tasks, scorers, the runner and memory coverage."""
