"""The `m3jax` command: `m3jax SUBCOMMAND --flags`.

Each subcommand is a module in `m3jax.commands` that defines its absl flags and a
`main(argv)`; only the chosen module is imported, so each command sees only its
own flags. Every module is also runnable as `python -m m3jax.commands.NAME`.
"""

from __future__ import annotations

import importlib
import sys

from absl import app

# name -> (module, one-line help). Only finished commands are listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "costs": ("m3jax.commands.costs", "parameter, storage and FLOP accounting from a config"),
    "convert": ("m3jax.commands.convert", "import/export Hugging Face Llama checkpoints"),
    "tokenizer": ("m3jax.commands.tokenizer", "train a sentencepiece tokenizer"),
    "prepare-data": ("m3jax.commands.prepare_data", "tokenizer, datasets, references, packing"),
    "build-index": ("m3jax.commands.build_index", "embed the references and build the ScaNN index"),
    "mine-neighbors": ("m3jax.commands.mine_neighbors",
                       "one overlap-filtered reference per training chunk"),
    "train": ("m3jax.commands.train", "warmup or continual training (resumes by itself)"),
    "encode-memory": ("m3jax.commands.encode_memory",
                      "encode every reference into the memory bank (resumable, multi-host)"),
    "bench encode": ("m3jax.commands.bench_encode", "reference encoding vs full forward tokens/s"),
    "generate": ("m3jax.commands.generate",
                 "complete prompts with explicit memory, no memory or RAG"),
    "eval": ("m3jax.commands.eval",
             "perplexity, multiple choice, knowledge QA in every memory mode"),
    "bench decode": ("m3jax.commands.bench_decode", "decode tokens/s: explicit memory vs none vs RAG"),
    "demo": ("m3jax.commands.demo", "whole pipeline on the knowledge world with its evidence table"),
    "bench train": ("m3jax.commands.bench_train",
                    "warmup vs continual step tokens/s, MFU and compiled memory"),
    "compile": ("m3jax.commands.compile",
                "per-chip memory, FLOPs and fit of a train step on a TPU slice (no TPU needed)"),
}

def usage() -> str:
  lines = ["usage: m3jax COMMAND [--flags]", "", "commands:"]
  lines += [f"  {name:<16} {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
  lines += ["", "m3jax COMMAND --helpfull lists a command's flags."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name = argv[1]
  if name == "bench" and len(argv) > 2 and not argv[2].startswith("-"):
    name = f"bench {argv[2]}"  # `m3jax bench KIND --flags`
    argv = [argv[0], name] + argv[3:]
  if name not in COMMANDS:
    print(f"m3jax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  module = importlib.import_module(COMMANDS[name][0])
  flags = argv[2:]
  if not any(f.split("=")[0] in ("--verbosity", "-v") for f in flags):
    # Libraries (tfds, orbax, jax) log every file they touch at INFO; our own progress
    # lines are prints. --verbosity=0 brings the INFO logs back.
    flags = ["--verbosity=-1"] + flags
  app.run(module.main, argv=[f"m3jax {name}"] + flags)
  return 0


if __name__ == "__main__":
  sys.exit(main())
