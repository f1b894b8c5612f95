"""`m3jax generate`: complete prompts with explicit memory, without memory, or with RAG.

  m3jax generate --checkpoint=runs/demo [--workdir=runs/demo] \\
      [--bank=runs/demo/bank] [--index=runs/demo/data/index] \\
      --prompt="Question: Where was Alia Ashwick born?\\nAnswer:" | --prompts_file=FILE \\
      [--memory=explicit|none|rag] [--max_new_tokens=64] [--temperature=0] [--top_p=1] \\
      [--seed=0] [--batch_size=16] [--overlap_threshold=0.667] [--output=FILE.jsonl] [--chat]

--prompts_file: one prompt per line (`\\n` inside a line is a newline), or JSONL
with a "prompt" field per line (.jsonl). Completions go to stdout (and, with
--output, to JSONL with the prompt). The data directory, index and bank default
to `<workdir>/data`, `<workdir>/data/index` and `<workdir>/bank`. Without a bank,
references are encoded on the fly. --overlap_threshold turns on the leakage
filter against each prompt (off by default when generating). --chat: each prompt
is a user turn (a .jsonl file may give whole `messages` lists) rendered with the
chat template of a post-trained model; the reply stops at `<|end|>`.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app
from absl import flags

from data_pipeline import chat as chat_lib
from m3jax import cli
from m3jax import commands
from m3jax.core.progress import Progress
from m3jax.inference import generate as gen_lib
from m3jax.inference import session as inference

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Params dir, training workdir, checkpoints dir or step dir.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default data/index/bank "
                               "locations); default: the checkpoint's.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "prepare-data directory (tokenizer, refs).")
_INDEX = flags.DEFINE_string("index", None, "Index directory (m3jax build-index).")
_BANK = flags.DEFINE_string("bank", None, "Memory bank directory (m3jax encode-memory).")
_MEMORY = flags.DEFINE_enum("memory", "explicit", list(gen_lib.MEMORY_MODES),
                            "explicit memory; none (sink prefix kept, memories masked); "
                            "text RAG; none-noprefix (the plain model, no prefix).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable; `\\n` = newline).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Prompts, one per line, or JSONL.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature > 0).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts per batch.")
_THRESHOLD = flags.DEFINE_float("overlap_threshold", None,
                                "Leakage filter: drop references whose overlap with the "
                                "prompt exceeds this (default: off).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Compute dtype (default: the checkpoint config's).")
_OUTPUT = flags.DEFINE_string("output", None, "Also write {prompt, completion} JSONL here.")
_CHAT = flags.DEFINE_bool("chat", False, "Prompts are user turns (or JSONL `messages`) put "
                          "through the chat template; a reply ends at <|end|>.")


def main(argv: list[str]) -> None:
  commands.check_args(argv)
  if not _CHECKPOINT.value:
    raise app.UsageError("--checkpoint is required (a params dir, workdir or step dir)")
  prompts = (chat_lib.read_chat_prompts(_PROMPTS_FILE.value, _PROMPT.value) if _CHAT.value
             else gen_lib.read_prompts(_PROMPTS_FILE.value, _PROMPT.value))
  sampling = gen_lib.Sampling(_TEMPERATURE.value, _TOP_P.value)
  if _MAX_NEW.value < 1 or _BATCH.value < 1:
    raise app.UsageError("--max_new_tokens and --batch_size must be >= 1")
  mode = _MEMORY.value
  inf = inference.open_inference(
      _CHECKPOINT.value, modes=[mode], workdir=_WORKDIR.value, data_dir=_DATA_DIR.value,
      index_dir=_INDEX.value, bank_dir=_BANK.value, overlap_threshold=_THRESHOLD.value,
      dtype=_DTYPE.value)
  template = chat_lib.ChatTemplate(inf.tokenizer) if _CHAT.value else None
  textgen = gen_lib.TextGenerator(
      gen_lib.Generator(inf.config, inf.params), inf.tokenizer, mode,
      retrieval=inference.memory_retrieval(inf) if mode == "explicit" else None,
      retriever=inf.retriever, references=inf.references, template=template)
  texts = [chat_lib.query_text(chat_lib.as_messages(p)) for p in prompts] if _CHAT.value \
      else prompts
  filters = texts if _THRESHOLD.value is not None else None
  progress = Progress(len(prompts), desc="generate", unit="prompts",
                      printer=lambda line: print(line, file=sys.stderr, flush=True))
  completions = textgen.complete(prompts, max_new_tokens=_MAX_NEW.value, sampling=sampling,
                                 key=jax.random.key(_SEED.value), batch_size=_BATCH.value,
                                 filter_texts=filters, on_batch=progress.update)
  rows = []
  for i, (p, c) in enumerate(zip(texts, completions)):
    print(f"=== [{i}] {mode} ===\n{p}\n--- completion ---\n{c.text}\n")
    rows.append(dict(prompt=p, completion=c.text, tokens=c.tokens,
                     stopped_at_eos=c.stopped_at_eos, memory=mode))
  print(f"({len(prompts)} prompts, memory={mode}, retrievals={textgen.stats['retrievals']}, "
        f"step={inf.step})", file=sys.stderr)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
