"""Evaluation with and without memory.

tasks (task names, items, loaders) and text_metrics (normalisation, exact
match, group means) < scoring (log-likelihoods per memory mode, task metrics) < coverage
(does the answer reach the memory) < runner (every task in every mode, the table
and the report).
"""
