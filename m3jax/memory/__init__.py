"""Explicit memories: the reference encoder, the memory bank on disk and its readers,
the offline encode job and memory quantization."""
