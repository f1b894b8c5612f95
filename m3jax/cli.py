"""The `m3jax` command: `m3jax SUBCOMMAND --flags`.

Each subcommand is a module in `m3jax.commands` that defines its absl flags and a
`main(argv)`; only the chosen module is imported, so each command sees only its
own flags. Every module is also runnable as `python -m m3jax.commands.NAME`; both
ways go through `run_module`, the one boundary every command shares:

- Help: `--help` / `-h` prints the module's docstring (purpose and example), its own
  flags, then the config fields it reads most (the module's optional `CONFIG_FIELDS`)
  with their values; `--helpfull` adds every other flag.
- Errors: a user error (`m3jax.core.errors.user_message`: `UserError` and the domain
  errors derived from it, OS errors such as a missing file or a read-only disk, bad
  flags and config overrides) prints ONE line `m3jax CMD: error: ...` and exits 1;
  Ctrl-C prints one line and exits 130. Anything else is a bug and keeps its
  traceback. `--verbosity=1` (or more) or `M3JAX_TRACEBACK=1` also prints the
  traceback of user errors.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import traceback
from types import ModuleType
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

from configs import base as base_config
from m3jax.core import errors

# name -> (module, one-line help). Only finished commands are listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "costs": ("m3jax.commands.costs", "parameter, storage and FLOP accounting from a config"),
    "convert": ("m3jax.commands.convert", "import/export Hugging Face Llama checkpoints"),
    "tokenizer": ("m3jax.commands.tokenizer", "train a sentencepiece tokenizer"),
    "prepare-data": ("m3jax.commands.prepare_data", "tokenizer, datasets, references, packing"),
    "build-index": ("m3jax.commands.build_index", "embed the references and build the ScaNN index"),
    "mine-neighbors": ("m3jax.commands.mine_neighbors",
                       "one overlap-filtered reference per training chunk"),
    "train": ("m3jax.commands.train",
              "warmup, continual, sft or dpo training (resumes by itself)"),
    "prepare-chat": ("m3jax.commands.prepare_chat",
                     "chat (SFT) and preference (DPO) datasets with retrieved references"),
    "encode-memory": ("m3jax.commands.encode_memory",
                      "encode every reference into the memory bank (resumable, multi-host)"),
    "bench encode": ("m3jax.commands.bench_encode", "reference encoding vs full forward tokens/s"),
    "generate": ("m3jax.commands.generate",
                 "complete prompts with explicit memory, no memory or RAG"),
    "eval": ("m3jax.commands.eval",
             "perplexity, multiple choice, knowledge QA in every memory mode"),
    "bench decode": ("m3jax.commands.bench_decode", "decode tokens/s: explicit memory vs none vs RAG"),
    "demo": ("m3jax.commands.demo", "whole pipeline on the knowledge world with its evidence table"),
    "demo-posttrain": ("m3jax.commands.demo_posttrain",
                       "SFT and DPO of the demo model, with chat accuracy and preference pairs"),
    "bench train": ("m3jax.commands.bench_train",
                    "warmup vs continual step tokens/s, MFU and compiled memory"),
    "compile": ("m3jax.commands.compile",
                "per-chip memory, FLOPs and fit of a train step on a TPU slice (no TPU needed)"),
    "bank update": ("m3jax.commands.bank_update",
                    "add, replace, delete references in a finished bank (live knowledge edit)"),
    "demo-edit": ("m3jax.commands.demo_edit",
                  "live knowledge edit on a finished demo workdir, with its evidence table"),
    "bench retrieval": ("m3jax.commands.bench_retrieval",
                        "index build, recall@5 and queries/s vs exact search and FAISS"),
}

HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")
HELPFULL_FLAGS = ("--helpfull",)
TRACEBACK_ENV = "M3JAX_TRACEBACK"
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def usage() -> str:
  lines = ["usage: m3jax COMMAND [--flags]", "", "commands:"]
  lines += [f"  {name:<16} {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
  lines += ["", "m3jax COMMAND --help describes a command; --helpfull lists every flag."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """`m3jax COMMAND --flags`; returns the exit code (callable in-process, e.g. by tests)."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name = argv[1]
  if name in ("bench", "bank") and len(argv) > 2 and not argv[2].startswith("-"):
    name = f"{name} {argv[2]}"  # `m3jax bench KIND --flags`, `m3jax bank update --flags`
    argv = [argv[0], name] + argv[3:]
  if name not in COMMANDS:
    print(f"m3jax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  return run_module(_import_command(COMMANDS[name][0]), argv[2:], name=name)


def command_name(module: ModuleType) -> str:
  """The COMMANDS name of a command module (also when it runs as `__main__`)."""
  spec = getattr(module, "__spec__", None)
  qualname = spec.name if spec is not None else module.__name__
  for name, (mod, _) in COMMANDS.items():
    if mod == qualname:
      return name
  return qualname.rsplit(".", 1)[-1].replace("_", "-")


def run_module(module: ModuleType, args: Sequence[str], name: str | None = None) -> int:
  """Parses `args` into the command's flags, runs `module.main`; returns the exit code.

  The shared boundary of every command: help, one-line user errors (exit 1), Ctrl-C
  (exit 130), tracebacks only for bugs (or on request).
  """
  name = name or command_name(module)
  prog = f"m3jax {name}"
  args = list(args)
  if any(a in HELPFULL_FLAGS for a in args):
    print(command_help(module, name, args, full=True))
    return 0
  if any(a in HELP_FLAGS for a in args):
    print(command_help(module, name, args))
    return 0
  if not any(a.split("=")[0] in ("--verbosity", "-v") for a in args):
    # Libraries (tfds, orbax, jax) log every file they touch at INFO; our own progress
    # lines are prints. --verbosity=0 brings the INFO logs back.
    args = ["--verbosity=-1"] + args
  saved_argv = sys.argv
  sys.argv = [prog] + args  # ml_collections reads --config.a.b overrides from sys.argv
  try:
    rest = _parse_flags(prog, args)
    logging.use_absl_handler()
    code = module.main(rest)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted; finished work is kept (rerun the same command to go on)",
          file=sys.stderr, flush=True)
    return INTERRUPTED
  except SystemExit as e:  # sys.exit() inside a command, or absl's own exits
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
      return 1
    return int(e.code or 0)
  except Exception as e:  # noqa: BLE001  (bugs are re-raised below)
    message = user_message(e)
    if message is None:
      raise
    if _want_traceback():
      traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 1
  finally:
    sys.argv = saved_argv
  return int(code or 0)


def user_message(e: BaseException) -> str | None:
  """One line for a user error (see m3jax.core.errors), or None for a bug."""
  if isinstance(e, (flags.Error, app.UsageError)):
    return " ".join(str(e).split())
  return errors.user_message(e)


def _want_traceback() -> bool:
  """--verbosity >= 1, or M3JAX_TRACEBACK set to anything but 0."""
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  try:
    return int(flags.FLAGS["verbosity"].value) >= 1
  except (KeyError, TypeError, ValueError):
    return False


# ------------------------------------------------------------------------ flags


def _import_command(module_name: str) -> ModuleType:
  """Imports a command module; first forgets command modules imported by earlier main()
  calls in this process (they define the same flag names, e.g. --config)."""
  by_module = flags.FLAGS.flags_by_module_dict()
  for other in [m for m in sys.modules if m.startswith("m3jax.commands.") and m != module_name]:
    for flag in list(by_module.get(other, [])):  # deleting a flag edits this list
      if flag.name in flags.FLAGS:
        delattr(flags.FLAGS, flag.name)
    del sys.modules[other]
  return importlib.import_module(module_name)


def _config_path(args: Sequence[str]) -> str | None:
  """The value of --config (either `--config=P` or `--config P`), if given."""
  for i, a in enumerate(args):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(args):
      return args[i + 1]
  return None


def _check_config_file(args: Sequence[str]) -> None:
  path = _config_path(args)
  if path is None or os.path.isfile(path) or os.path.isfile(path.split(":", 1)[0]):
    return
  where = "" if os.path.isabs(path) else (
      f" (relative to {os.getcwd()}: run from the repository root or give an absolute path)")
  raise errors.UserError(f"--config={path}: no such config file{where}")


def _parse_flags(prog: str, args: list[str]) -> list[str]:
  """FLAGS(argv) after a fresh start (main() may run several times in one process)."""
  fv = flags.FLAGS
  _check_config_file(args)
  fv.unparse_flags()
  for name in [n for n in fv if n.startswith("config.")]:  # earlier --config.a.b overrides
    delattr(fv, name)
  try:
    return fv([prog] + args)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
    raise errors.UserError(_override_message(e, args)) from e
  except (TypeError, ValueError) as e:
    raise errors.UserError(" ".join(str(e).split())) from e


def _override_message(e: Exception, args: Sequence[str]) -> str:
  text = str(e).replace("\\'", "'").replace("\\n", " ")
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  words = re.findall(r"\w+", text)
  key = hint.group(2) if hint else (words[0] if words else "?")
  flag = next((a.split("=")[0] for a in args if a.startswith("--config.")
               and key in a.split("=")[0].split(".")), "--config")
  msg = f"{flag}: unknown config field `{key}`"
  if hint:
    msg += f"; did you mean `{hint.group(1)}`?"
  return msg + " (configs/base.py lists every field)"


# ------------------------------------------------------------------------ help


def command_help(module: ModuleType, name: str, args: Sequence[str] = (),
                 full: bool = False) -> str:
  """Purpose and example (docstring), own flags, main config fields; `full` adds the rest."""
  doc = (module.__doc__ or COMMANDS.get(name, ("", ""))[1]).strip()
  out = [doc if doc.startswith(f"`m3jax {name}`") else f"m3jax {name}: {doc}", ""]
  own = flags.FLAGS.flags_by_module_dict().get(module.__name__, [])
  if own:
    out += ["flags:", _flag_lines(own), ""]
  others = {m: fl for m, fl in flags.FLAGS.flags_by_module_dict().items()
            if m != module.__name__ and m.startswith(("m3jax", "data_pipeline"))}
  for m, fl in sorted(others.items()):
    out += [f"flags of {m}:", _flag_lines(fl), ""]
  fields = getattr(module, "CONFIG_FIELDS", ())
  if fields:
    values, source = _config_values(args)
    comments = _field_comments()
    out.append(f"config fields it reads most (values from {source}; set with "
               "--config.FIELD=VALUE):")
    for field in fields:
      value = values.get(field, "?")
      note = f"  # {comments[field]}" if field in comments else ""
      out.append(f"  {field} = {value!r}{note}")
    out.append("")
  if any(f.name == "config" for f in own):
    out.append("Every config field is in configs/base.py (with its comment).")
  if full:
    absl_mods = {m: fl for m, fl in flags.FLAGS.flags_by_module_dict().items()
                 if m not in others and m != module.__name__}
    for m, fl in sorted(absl_mods.items()):
      out += ["", f"flags of {m}:", _flag_lines(fl)]
  else:
    out.append(f"m3jax {name} --helpfull also lists the absl and logging flags.")
  return "\n".join(out).rstrip()


def _flag_lines(flag_list: list[Any]) -> str:
  lines = []
  for f in sorted(flag_list, key=lambda f: f.name):
    value = ",".join(map(str, f.default)) if isinstance(f.default, list) else f.default
    default = "" if value in (None, "", []) else f" (default: {value})"
    lines.append(f"  --{f.name}: {' '.join((f.help or '').split())}{default}")
  return "\n".join(lines)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _config_values(args: Sequence[str]) -> tuple[dict[str, Any], str]:
  """Field values of --config (with its overrides) when given and loadable, else base's."""
  path = _config_path(args)
  if path and os.path.isfile(path):
    from m3jax.core import config as config_lib  # heavy-ish; only for help with --config
    try:
      cfg = config_lib.load_config(path, [a[2:] for a in args if a.startswith("--config.")])
      return _flatten(cfg.to_dict()), path
    except Exception:  # noqa: BLE001  help still prints with base's values
      pass
  return _flatten(base_config.get_config().to_dict()), "configs/base.py"


def _field_comments() -> dict[str, str]:
  """`section.field -> comment` from configs/base.py's trailing `# ...` comments."""
  try:
    with open(base_config.__file__, encoding="utf-8") as f:
      source = f.read()
  except OSError:
    return {}
  alias = dict(re.findall(r"^\s*(\w+) = c\.(\w+) = ", source, flags=re.M))
  alias["c"] = ""
  out = {}
  for var, field, comment in re.findall(r"^\s*(\w+)\.(\w+) = .*?#\s*(.+)$", source, flags=re.M):
    if var in alias:
      out[f"{alias[var]}.{field}".lstrip(".")] = comment.strip()
  return out


if __name__ == "__main__":
  sys.exit(main())
