"""How m3jax jobs start: local multi-process (`python -m launch.local`), SLURM, TPU VMs, GKE.

See WORKSPACE.md ("Multi-host and clusters") for the exact commands.
"""
