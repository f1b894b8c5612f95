"""lm-evaluation-harness adapter: a local task through lm-eval gives `m3jax eval`'s numbers."""

import json
import os
import textwrap
from types import SimpleNamespace

import pytest

lm_eval = pytest.importorskip("lm_eval")
lm_eval_tasks = pytest.importorskip("lm_eval.tasks")

from m3jax.evaluation import lm_eval_adapter  # noqa: E402  (registers "m3jax")
from m3jax.evaluation import runner  # noqa: E402
from m3jax.evaluation import tasks as tasks_lib  # noqa: E402
from m3jax.inference import generate as gen_lib  # noqa: E402
from m3jax.inference import session as inference  # noqa: E402

# The module fixture prepares, indexes and encodes a tiny knowledge base (~60 s on 2 cores).
pytestmark = pytest.mark.slow

N_ITEMS = 9  # 3 per entity group
BATCH = 8


@pytest.fixture(scope="module")
def local_task(tiny_knowledge_base, tmp_path_factory):
  """The tiny world's multiple-choice questions as a HellaSwag-style JSONL and a task YAML
  over it (read with `datasets`' json builder: no network)."""
  d = tmp_path_factory.mktemp("lm_eval_task")
  _, mc = tasks_lib.load_knowledge_qa(tiny_knowledge_base["root"], N_ITEMS)
  rows = [dict(ctx=it.context, endings=[c[1:] for c in it.choices], label=it.gold) for it in mc]
  data = d / "items.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (d / "m3jax_local_mc.yaml").write_text(textwrap.dedent(f"""\
      task: m3jax_local_mc
      dataset_path: json
      dataset_kwargs:
        data_files:
          test: {data}
      test_split: test
      output_type: multiple_choice
      doc_to_text: "{{{{ctx}}}}"
      doc_to_choice: "{{{{endings}}}}"
      doc_to_target: label
      metric_list:
        - metric: acc
      """))
  return dict(dir=str(d), data=str(data))


def _model_args(kb, mode):
  return (f"checkpoint={kb['checkpoint']},data_dir={kb['root']},bank={kb['bank']},"
          f"memory={mode},batch_size={BATCH}")


@pytest.mark.parametrize("mode", ["explicit", "none", "rag"])
def test_lm_eval_accuracy_equals_m3jax_eval(tiny_knowledge_base, local_task, mode,
                                            monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  kb = tiny_knowledge_base
  tm = lm_eval_tasks.TaskManager(include_path=local_task["dir"])
  out = lm_eval.simple_evaluate(model="m3jax", model_args=_model_args(kb, mode),
                                tasks=["m3jax_local_mc"], task_manager=tm,
                                num_fewshot=0)
  got = out["results"]["m3jax_local_mc"]["acc,none"]
  inf = inference.open_inference(kb["checkpoint"], modes=[mode], data_dir=kb["root"],
                                 bank_dir=kb["bank"])
  items = tasks_lib.load_mc_jsonl("hellaswag", local_task["data"])
  report = runner.evaluate_checkpoint(inf, {"hellaswag": items}, [mode],
                                      threshold=runner.filter_threshold(inf, True, None),
                                      batch_size=BATCH, log=lambda _: None)
  want = report["results"]["hellaswag"][mode]["acc"]["all"]
  assert len(items) == N_ITEMS
  assert got == pytest.approx(want, abs=1e-9)


def test_rolling_and_generation_are_m3jax_evals(tiny_knowledge_base):
  kb = tiny_knowledge_base
  lm = lm_eval_adapter.M3jaxLM(kb["checkpoint"], memory="explicit", data_dir=kb["root"],
                               bank=kb["bank"], batch_size=BATCH)
  text = "Question: Where was the person born?\nAnswer: The person was born in"
  [rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,), doc=None)])
  tok = lm.inf.tokenizer
  nll, n = lm.scorer.sequence_nll([[lm.inf.config.bos_id] + list(tok.encode(text))])
  assert rolling == pytest.approx(-nll) and n == len(tok.encode(text))
  reqs = [SimpleNamespace(args=(text, dict(until=["."], max_gen_toks=6)), doc=None)]
  [gen] = lm.generate_until(reqs)
  textgen = gen_lib.TextGenerator(gen_lib.Generator(lm.inf.config, lm.inf.params), tok,
                                  "explicit", retrieval=lm.retrieval)
  want = textgen.complete([text], max_new_tokens=6, queries=[text], filter_texts=[text])[0]
  assert gen == want.text.split(".")[0]
  with pytest.raises(ValueError, match="memory='recall'"):
    lm_eval_adapter.M3jaxLM(kb["checkpoint"], memory="recall")
