"""`m3jax convert`: Hugging Face Llama checkpoints <-> m3jax params directories.

  m3jax convert --from_hf=HF_DIR --out=PARAMS_DIR [--reference_prefix_ids=1,1234,29901]
                [--override=model.memory_layers=[4,5,6,7]]
  m3jax convert --to_hf --checkpoint=PARAMS_DIR --out=HF_DIR

Import reads config.json + model.safetensors (or a sharded index) and writes an
m3jax params directory (config.json + Orbax params/, see m3jax.model.params_io). Export
writes config.json + model.safetensors loadable by transformers' LlamaForCausalLM.
Existing outputs are never overwritten.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.model import hf_convert as convert
from m3jax.model import params_io

_FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face Llama checkpoint dir to import.")
_TO_HF = flags.DEFINE_bool("to_hf", False, "Export --checkpoint to a Hugging Face Llama dir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "m3jax params directory to export (with --to_hf).")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not hold a checkpoint yet).")
_PREFIX = flags.DEFINE_list(
    "reference_prefix_ids", None,
    "Token ids of the '<s>Reference:' sink prefix for an imported model; default: [bos] + "
    "the ids of 'Reference:' from tokenizer.model / tokenizer.json in --from_hf.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "Config override `model.field=value` for the imported config (repeatable).")


def _prefix_ids() -> tuple[int, ...] | None:
  if _PREFIX.value is None:
    return None
  try:
    return tuple(int(v) for v in _PREFIX.value)
  except ValueError:
    raise app.UsageError(
        f"--reference_prefix_ids: {_PREFIX.value} is not a list of integers") from None


def main(argv: list[str]) -> None:
  commands.check_args(argv)
  if _OUT.value is None:
    raise app.UsageError("--out is required")
  if bool(_FROM_HF.value) == bool(_TO_HF.value):
    raise app.UsageError("give exactly one of --from_hf=DIR or --to_hf --checkpoint=DIR")
  out = _OUT.value
  if _FROM_HF.value:
    if os.path.exists(os.path.join(out, params_io.PARAMS_DIR)) or os.path.exists(
        os.path.join(out, params_io.CONFIG_FILE)):
      raise FileExistsError(f"{out} already holds an m3jax params directory; refusing to "
                            "overwrite")
    cfg, params = convert.load_hf(_FROM_HF.value, reference_prefix_ids=_prefix_ids(),
                                  overrides=_OVERRIDES.value)
    logging.info("imported %s: %s", _FROM_HF.value,
                 convert.model_config_summary(config_lib.model_config(cfg)))
    params_io.save_params(out, params, cfg)
    print(f"wrote m3jax params directory {out}")
  else:
    if not _CHECKPOINT.value:
      raise app.UsageError("--to_hf needs --checkpoint=PARAMS_DIR")
    if _PREFIX.value is not None or _OVERRIDES.value:
      raise app.UsageError("--reference_prefix_ids / --override apply to --from_hf only")
    cfg, params = params_io.load_params(_CHECKPOINT.value)
    convert.to_hf(params, config_lib.validate(cfg), out)
    print(f"wrote Hugging Face Llama checkpoint {out}")


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
