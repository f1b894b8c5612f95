"""The jnp dtype of each dtype name a config may hold (`model.dtype`, `model.param_dtype`).

The names are the ones `m3jax.core.config` validates (`DTYPE_NAMES`); the model and
its KV cache read their dtypes from this one table.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from m3jax.core.config import DTYPE_NAMES

JNP_DTYPES: dict[str, Any] = {name: getattr(jnp, name) for name in DTYPE_NAMES}
