"""Foundations every layer uses: config, artifacts on disk, distributed start-up, progress, metrics.

Nothing here knows about models, retrieval or memories (docs/architecture.md).
"""
