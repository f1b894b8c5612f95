"""Planning runs on accelerators this machine lacks (`m3jax compile`).

The real TPU compiler (libtpu, the `tpu` extra) compiles a training step for a named
slice from the devices of a topology description, so per-chip memory and FLOPs are
known before a pod is booked.
"""
