"""`m3jax-lm-eval`: lm-evaluation-harness's command line with the "m3jax" model registered.

  m3jax-lm-eval --model m3jax \\
      --model_args checkpoint=runs/demo/continual,workdir=runs/demo,memory=explicit \\
      --tasks hellaswag,arc_easy,boolq --batch_size 8

Every flag is lm-eval's own (`lm_eval --help`); the model arguments are those of
m3jax.evaluation.lm_eval_adapter. lm-eval 0.4 finds models only in its own registry,
so this command imports the adapter (which registers "m3jax") and then runs lm-eval's
CLI. Also runnable as `python -m m3jax.commands.lm_eval`. Needs the `eval` extra.
"""

from __future__ import annotations

import sys


def main() -> None:
  try:
    from lm_eval.__main__ import cli_evaluate  # optional dependency (the `eval` extra)
    from m3jax.evaluation import lm_eval_adapter  # noqa: F401  registers --model m3jax
  except ImportError as e:
    print(f"m3jax-lm-eval: error: {e}; install the eval extra: pip install 'm3jax[eval]'",
          file=sys.stderr)
    sys.exit(1)
  cli_evaluate()


if __name__ == "__main__":
  main()
