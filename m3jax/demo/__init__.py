"""`m3jax demo`: the whole pipeline on the embedded knowledge world, with its evidence."""
