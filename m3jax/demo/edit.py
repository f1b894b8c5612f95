"""`m3jax demo-edit`: a live knowledge edit on a finished demo workdir, with its evidence.

    run_edit_demo(workdir, people=100) -> report dict (also <workdir>/edit_demo.json)

On a workdir where `m3jax demo` has finished (a copy: the bank is edited in place):

1. picks the first `people` unseen people of the knowledge world (nothing about them is
   in the training text; their facts live only in the knowledge base) and gives each a
   new value of `attribute` (default birth city), the next one of its value list;
2. answers, with explicit memory and the leakage filter on, one question on that
   attribute per edited person plus the held-out knowledge-world questions of the demo's eval
   (`eval_limit`, an equal share per group, as `demo.eval_limit`), before the edit;
3. replaces each edited person's knowledge-base sentence stating it ("X was born on D in
   C.") with the one naming the new value (`m3jax bank update --replace`,
   m3jax.memory.edit_job);
4. answers the same questions again from the edited bank and index.

Reported: (a) among the edited questions answered correctly before, the share whose
answer is now the new value (target >= 80%); (b) the share of all other answers that did
not change (target >= 98%); (c) the edit's wall time (`m3jax bank update`, all of it:
loading the model and index included) against a full re-encode of the bank measured in the
same run (the same checkpoint and settings; written to a scratch directory, then deleted).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from data_pipeline import knowledge_world as kw_lib
from data_pipeline import prepared
from m3jax.core import artifacts
from m3jax.core import workspace
from m3jax.core.config import config_from_json
from m3jax.core.errors import InputError
from m3jax.evaluation import tasks as eval_tasks
from m3jax.evaluation.text_metrics import exact_match
from m3jax.inference import generate as gen_lib
from m3jax.inference import session as inference
from m3jax.memory import bank_edits
from m3jax.memory import edit_job
from m3jax.memory import encode_job
from m3jax.model import params_io

REPORT_FILE = "edit_demo.json"
TARGETS = dict(follows_edit=0.80, others_unchanged=0.98)
# Attributes an edit may change alone (employer and employer_city are one fact; dates have
# no value list).
EDITABLE = ("birth_city", "university", "field", "hobby", "instrument")


def _say(msg: str) -> None:
  print(f"demo-edit: {msg}", flush=True)


def _sentence_refs(refs: Any) -> dict[int, int]:
  """doc_id -> ref_id of the knowledge-base documents that are one reference each."""
  ids = np.arange(len(refs))
  docs = refs.doc_ids(ids)
  counts = np.bincount(docs[docs >= 0])
  return {int(d): int(i) for i, d in zip(ids.tolist(), docs.tolist()) if counts[d] == 1}


def plan_edit(cfg: Any, refs: Any, people: int, attribute: str = "birth_city"
              ) -> tuple[list[dict[str, Any]], dict[int, str]]:
  """The edited people (name, old and new value, ref_id) and the replacements {ref_id: text}."""
  if attribute not in EDITABLE:
    raise InputError(f"--attribute={attribute!r}: one of {EDITABLE}")
  world = kw_lib.generate(cfg.data.knowledge_world)
  one_ref = _sentence_refs(refs)
  values = kw_lib.value_lists()[attribute]
  sentence = kw_lib.KB_SENTENCE_OF[attribute]
  chosen, replace = [], {}
  for e in world.entities:
    if len(chosen) == people:
      break
    doc = e.id * len(kw_lib.KB_SENTENCES) + sentence
    if e.group != "unseen" or doc not in one_ref:
      continue
    old = e.attributes[attribute]
    new = values[(values.index(old) + 1) % len(values)]
    text = kw_lib.kb_sentences(e)[sentence]
    if refs.texts_by_ids([one_ref[doc]])[0] != text:
      raise RuntimeError(f"ref_id {one_ref[doc]} is not {e.name}'s sentence {text!r}")
    replace[one_ref[doc]] = kw_lib.KB_SENTENCES[sentence].format(
        name=e.name, **{**e.attributes, attribute: new})
    chosen.append(dict(entity_id=e.id, name=e.name, old=old, new=new, ref_id=one_ref[doc]))
  if len(chosen) < people:
    raise InputError(f"only {len(chosen)} unseen people have a one-reference sentence "
                       f"stating their {attribute}")
  return chosen, replace


def _answer(workdir: str, root: str, items: list[eval_tasks.QAItem], s: dict[str, Any]
            ) -> list[str]:
  inf = inference.open_inference(os.path.join(workdir, "continual"), modes=["explicit"],
                                 workdir=workdir, data_dir=root,
                                 bank_dir=workspace.bank_dir(workdir), log=_say)
  inf.retriever = inf.retriever.with_threshold(float(inf.cfg.data.eval_overlap_threshold))
  textgen = gen_lib.TextGenerator(gen_lib.Generator(inf.config, inf.params), inf.tokenizer,
                                  "explicit", retrieval=inference.memory_retrieval(
                                      inf, cache_queries=True))
  done = textgen.complete([it.prompt for it in items], max_new_tokens=s["max_new_tokens"],
                          batch_size=s["batch_size"], queries=[it.question for it in items],
                          filter_texts=[it.question for it in items])
  if hasattr(inf.memory_source, "close"):
    inf.memory_source.close()
  return [c.text for c in done]


def _full_encode_seconds(cfg: Any, workdir: str, root: str, log: Callable[[str], None]
                         ) -> tuple[float, int]:
  """Wall time of encoding the whole bank again (same checkpoint, settings and machine),
  into a scratch directory that is deleted afterwards: what the edit is compared with."""
  scratch = os.path.join(workdir, "edit_demo_full_encode")
  shutil.rmtree(scratch, ignore_errors=True)
  checkpoint = os.path.join(workdir, "continual")
  t0 = time.perf_counter()
  ckpt_cfg, params, step = params_io.load_for_inference(checkpoint)
  result = encode_job.run(cfg, checkpoint=checkpoint, checkpoint_config=ckpt_cfg,
                          params=params, step=step, references=root, out=scratch,
                          printer=log, progress_every_s=1e9)
  seconds = time.perf_counter() - t0
  shutil.rmtree(scratch, ignore_errors=True)
  return seconds, result.num_references


def _first_sentence(text: str) -> str:
  return text.split(".")[0].split("\n")[0].strip()


def run_edit_demo(workdir: str, *, people: int = 100, attribute: str = "birth_city",
                  eval_limit: int = 480,
                  batch_size: int = 32, max_new_tokens: int = 12,
                  log: Callable[[str], None] = _say) -> dict[str, Any]:
  """Runs the edit on `workdir` (a finished demo workdir; its bank is edited in place)."""
  workdir = os.path.abspath(workdir)
  bank = workspace.bank_dir(workdir)
  if bank_edits.version(bank_edits.read_meta(bank)):
    raise InputError(f"{bank} is already edited; run demo-edit on a fresh copy of the demo "
                       "workdir")
  cfg = config_from_json(os.path.join(workdir, "continual", "config.json"))
  root = os.path.join(workdir, "data")  # a copied workdir's own data (the config may name
  if not os.path.isfile(os.path.join(root, workspace.DATA_MANIFEST)):  # the original's)
    root = workspace.data_root(cfg, workdir)
  chosen, replace = plan_edit(cfg, prepared.open_references(root), people, attribute)
  edited_ids = {c["entity_id"] for c in chosen}
  q, lead = kw_lib.QUESTION_TEMPLATES[attribute][0], kw_lib.ANSWER_LEADS[attribute]
  edited_items = [eval_tasks.QAItem(kw_lib.qa_prompt(q.format(name=c["name"]),
                                                     lead.format(name=c["name"])),
                                    c["old"], q.format(name=c["name"]), "unseen")
                  for c in chosen]
  by_group: dict[str, list[eval_tasks.QAItem]] = {}
  for x in prepared.read_questions(root, "eval"):
    if not (x.entity_id in edited_ids and x.attribute == attribute):
      by_group.setdefault(x.group, []).append(
          eval_tasks.QAItem(x.prompt, x.answer, x.question, x.group))
  share = (eval_limit // max(len(by_group), 1)) if eval_limit else None
  others = [it for g in sorted(by_group) for it in by_group[g][:share]]
  s = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
  items = edited_items + others
  log(f"answering {len(items)} questions before the edit ({len(edited_items)} edited, "
      f"{len(others)} others)")
  before = _answer(workdir, root, items, s)
  edit_file = os.path.join(workdir, "edit_demo_replace.jsonl")
  artifacts.write_bytes(edit_file, "".join(json.dumps(dict(ref_id=r, text=t)) + "\n"
                                           for r, t in sorted(replace.items())).encode())
  t0 = time.perf_counter()
  result = edit_job.run(bank, replace=edit_file, printer=log)
  edit_s = time.perf_counter() - t0
  after = _answer(workdir, root, items, s)
  n_e = len(edited_items)
  correct_before = [i for i in range(n_e) if exact_match(_first_sentence(before[i]),
                                                         chosen[i]["old"])]
  follows = [i for i in correct_before if exact_match(_first_sentence(after[i]),
                                                      chosen[i]["new"])]
  follows_any = [i for i in range(n_e) if exact_match(_first_sentence(after[i]),
                                                      chosen[i]["new"])]
  unchanged = [i for i in range(n_e, len(items)) if before[i] == after[i]]
  names = [c["name"] for c in chosen]
  same_person = {i for i in range(n_e, len(items)) if any(n in items[i].question for n in names)}
  unchanged_same = [i for i in unchanged if i in same_person]
  full_s, full_refs = _full_encode_seconds(cfg, workdir, root, log)
  report = dict(
      workdir=workdir, people=people, attribute=attribute, edited_questions=n_e,
      correct_before=len(correct_before), follows_edit=len(follows),
      follows_edit_share=len(follows) / max(len(correct_before), 1),
      follows_edit_share_all=len(follows_any) / max(n_e, 1),
      other_questions=len(others), others_unchanged=len(unchanged),
      others_unchanged_share=len(unchanged) / max(len(others), 1),
      other_questions_on_edited_people=len(same_person),
      others_on_edited_people_unchanged=len(unchanged_same),
      edit_seconds=edit_s, edit_references_encoded=result.references_encoded,
      edit_encode_seconds=result.encode_seconds, shards_rewritten=len(result.shards_written),
      full_encode_seconds=full_s, full_encode_references=full_refs,
      speedup=full_s / edit_s if edit_s else float("nan"),
      targets=TARGETS, bank_version=result.version,
      examples=[dict(name=chosen[i]["name"], old=chosen[i]["old"], new=chosen[i]["new"],
                     before=before[i], after=after[i]) for i in range(min(5, n_e))])
  artifacts.write_bytes(os.path.join(workdir, REPORT_FILE),
                        json.dumps(report, indent=2).encode())
  log("\n" + format_report(report))
  return report


def format_report(r: dict[str, Any]) -> str:
  """The evidence table (markdown)."""
  t = r["targets"]
  rows = [
      (f"(a) edited questions ({r['attribute']}) answered with the new value, of those "
       "correct before",
       f"{r['follows_edit']}/{r['correct_before']} = {r['follows_edit_share']:.1%}",
       f">= {t['follows_edit']:.0%}"),
      ("    all edited questions: correct before (old value) -> after (new value)",
       f"{r['correct_before']}/{r['edited_questions']} -> "
       f"{round(r['follows_edit_share_all'] * r['edited_questions'])}/{r['edited_questions']}",
       ""),
      ("(b) other answers unchanged",
       f"{r['others_unchanged']}/{r['other_questions']} = {r['others_unchanged_share']:.1%}",
       f">= {t['others_unchanged']:.0%}"),
      ("    of which on the edited people's other facts",
       f"{r['others_on_edited_people_unchanged']}/{r['other_questions_on_edited_people']}",
       ""),
      ("    of which on everyone else",
       f"{r['others_unchanged'] - r['others_on_edited_people_unchanged']}/"
       f"{r['other_questions'] - r['other_questions_on_edited_people']}", ""),
      ("(c) edit wall time (all steps) vs full re-encode of the bank",
       f"{r['edit_seconds']:.1f} s ({r['edit_references_encoded']} refs, "
       f"{r['shards_rewritten']} shards) vs {r['full_encode_seconds']:.1f} s "
       f"({r['full_encode_references']} refs): {r['speedup']:.1f}x", ""),
  ]
  out = ["| measure | result | target |", "|---|---|---|"]
  out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
  return "\n".join(out)
