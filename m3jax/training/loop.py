"""The training loop of both stages: data, sharded state, steps, metrics, checkpoints.

`train(cfg, workdir)` owns everything around the pure step (m3jax.training.step):
it builds the mesh, creates or restores the sharded train state, feeds global
batches from the grain loader, logs metrics, evaluates held-out loss with and
without memory, and checkpoints the state together with the data-iterator state.

Start-up order: an existing checkpoint in the workdir always wins (automatic
resume, bitwise-identical continuation on the same hardware); otherwise a
continual run initialises its parameters from `train.init_from` (a warmup workdir,
checkpoint dir or params dir) with a fresh optimizer; otherwise parameters are
initialised from `seed`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipeline import loader as loader_lib
from data_pipeline import prepared
from m3jax.core import artifacts
from m3jax.core import config as config_lib
from m3jax.core import hardware
from m3jax.core import metrics as metrics_lib
from m3jax.core import workspace
from m3jax.core.progress import Progress
from m3jax.core.errors import InputError
from m3jax.model import costs
from m3jax.model import params_io
from m3jax.model import sharding as sharding_lib
from m3jax.model.transformer import Transformer
from m3jax.retrieval import neighbor_table
from m3jax.retrieval import rag as rag_lib
from m3jax.training import chat_data
from m3jax.training import checkpoint as ckpt_lib
from m3jax.training import dpo as dpo_lib
from m3jax.training import optim
from m3jax.training import rag_reader
from m3jax.training import step as step_lib
from m3jax.training.preemption import PreemptionGuard



def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


@dataclasses.dataclass
class RunContext:
  """What a run builds once: mesh, rules, shardings, the jitted step functions."""
  cfg: ml_collections.ConfigDict
  model_config: Any
  mesh: jax.sharding.Mesh
  rules: Any
  tx: Any
  schedule: Callable
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  use_memory: bool


POST_STAGES = ("sft", "dpo")  # post-training on chat data (m3jax.training.chat_data)


def uses_memory(cfg: ml_collections.ConfigDict) -> bool:
  """Continual training reads memory (unless it trains the text-RAG reader); warmup only
  in the from-scratch ablation; post-training unless `train.chat_memory` is off."""
  if cfg.train.stage in POST_STAGES:
    return bool(cfg.train.chat_memory)
  if is_rag_reader(cfg):
    return False
  return cfg.train.stage == "continual" or bool(cfg.train.use_memory)


def is_rag_reader(cfg: ml_collections.ConfigDict) -> bool:
  """`train.reader = "rag"`: the continual stage's text-RAG competitor (rag_reader.py)."""
  return cfg.train.get("reader", "memory") == "rag"


def state_class(cfg: ml_collections.ConfigDict) -> type:
  """DPO keeps the frozen reference parameters in its state; every other stage does not."""
  return dpo_lib.DpoState if cfg.train.stage == "dpo" else step_lib.TrainState


def batch_shard_count(mesh: jax.sharding.Mesh, rules: Any) -> int:
  """How many ways the rules split a batch's leading axis over the mesh."""
  n = 1
  batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  for ax in (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)):
    if ax is not None:
      n *= mesh.shape[ax]
  return n


def build_context(cfg: ml_collections.ConfigDict,
                  devices: Sequence[jax.Device] | None = None) -> RunContext:
  """Mesh, optimizer and the shardings of the train state and of batches.

  devices: the mesh's devices (default: all local and remote devices); `m3jax compile`
  passes the devices of a TPU topology description to compile for a slice it lacks.
  """
  mc = config_lib.model_config(cfg)
  mesh = sharding_lib.make_mesh(cfg, devices)
  rules = sharding_lib.axis_rules(cfg)
  tx = optim.make_optimizer(cfg.train)
  schedule = optim.learning_rate_schedule(cfg.train)
  n_batch_shards = batch_shard_count(mesh, rules)
  if cfg.data.batch_size % (n_batch_shards * cfg.train.grad_accum):
    raise config_lib.ConfigError(
        f"config field `data.batch_size`: {cfg.data.batch_size} is not divisible by the "
        f"{n_batch_shards} batch shards of the mesh x train.grad_accum={cfg.train.grad_accum}")
  abstract = abstract_state(mc, tx, state_class(cfg))
  state_shardings = sharding_lib.logical_shardings(abstract, mesh, rules)
  sharding_lib.check_divisible(abstract.params, state_shardings.params)
  batch_sharding = sharding_lib.logical_sharding(mesh, rules, ("batch",))
  return RunContext(cfg, mc, mesh, rules, tx, schedule, state_shardings, batch_sharding,
                    uses_memory(cfg))


def abstract_state(mc, tx, cls: type = step_lib.TrainState) -> step_lib.TrainState:
  """Boxed abstract train state (logical axes on params and optimizer moments)."""
  tokens = jax.ShapeDtypeStruct((1, mc.chunk_length), jnp.int32)

  def init(rng):
    params = Transformer(mc).init(rng, jnp.zeros(tokens.shape, tokens.dtype))["params"]
    return cls.create(params, tx)

  return jax.eval_shape(init, jax.random.key(0))


def init_state(ctx: RunContext, rng: jax.Array, params: Any = None) -> step_lib.TrainState:
  """A fresh state in its shardings (from `rng`, or around given parameters)."""
  mc, tx, cls = ctx.model_config, ctx.tx, state_class(ctx.cfg)

  def init(rng, params):
    if params is None:
      params = Transformer(mc).init(rng, jnp.zeros((1, mc.chunk_length), jnp.int32))["params"]
    return nn.unbox(cls.create(nn.unbox(params), tx))

  with sharding_lib.use_mesh(ctx.mesh, ctx.rules):
    if params is None:
      return jax.jit(lambda r: init(r, None), out_shardings=ctx.state_shardings)(rng)
    params = jax.device_put(params, ctx.state_shardings.params)
    return jax.jit(lambda p: init(None, p), out_shardings=ctx.state_shardings)(params)


def abstract_state_with_shardings(ctx: RunContext) -> Any:
  """The unboxed abstract train state, each leaf a ShapeDtypeStruct with its sharding."""
  abstract = nn.unbox(abstract_state(ctx.model_config, ctx.tx, state_class(ctx.cfg)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, ctx.state_shardings)


def compile_steps(ctx: RunContext) -> tuple[Callable, Callable, Callable | None]:
  """Jitted (train_step, eval_step without memory, eval_step with memory or None)."""
  t = ctx.cfg.train
  if t.stage == "dpo":
    return _compile_dpo_steps(ctx)
  train_fn = step_lib.make_train_step(
      ctx.model_config, ctx.tx, use_memory=ctx.use_memory, grad_accum=int(t.grad_accum),
      grad_through_references=bool(t.grad_through_references), lr_schedule=ctx.schedule)
  train = jax.jit(train_fn, in_shardings=(ctx.state_shardings, ctx.batch_sharding),
                  out_shardings=(ctx.state_shardings, None), donate_argnums=(0,))
  params_sh = ctx.state_shardings.params
  # A memory-trained model is evaluated without memory as it was trained: the sink
  # prefix kept, every memory masked.
  plain = jax.jit(step_lib.make_eval_step(ctx.model_config, use_memory=False,
                                          with_prefix=ctx.use_memory),
                  in_shardings=(params_sh, ctx.batch_sharding))
  with_mem = None
  if ctx.model_config.n_memory_layers and not is_rag_reader(ctx.cfg):
    with_mem = jax.jit(step_lib.make_eval_step(ctx.model_config, use_memory=True),
                       in_shardings=(params_sh, ctx.batch_sharding))
  return train, plain, with_mem


def _compile_dpo_steps(ctx: RunContext) -> tuple[Callable, Callable, None]:
  t = ctx.cfg.train
  train_fn = dpo_lib.make_dpo_train_step(ctx.model_config, ctx.tx, beta=float(t.dpo_beta),
                                         use_memory=ctx.use_memory, lr_schedule=ctx.schedule)
  train = jax.jit(train_fn, in_shardings=(ctx.state_shardings, ctx.batch_sharding),
                  out_shardings=(ctx.state_shardings, None), donate_argnums=(0,))
  params_sh = ctx.state_shardings.params
  ev = jax.jit(dpo_lib.make_dpo_eval_step(ctx.model_config, beta=float(t.dpo_beta),
                                          use_memory=ctx.use_memory),
               in_shardings=(params_sh, params_sh, ctx.batch_sharding))
  return train, ev, None


# ------------------------------------------------------------------------ data


def memory_inputs(cfg, root: str, split: str) -> tuple[Any, Any] | None:
  """(NeighborTable, ReferenceStore) of a split, or None when it has no neighbor table.

  The table is checked against its corpus, references, tokenizer and the config's
  mining settings, so a stale table is refused rather than silently used.
  """
  path = workspace.neighbors_dir(root, split)
  if not os.path.exists(os.path.join(path, neighbor_table.MANIFEST)):
    return None
  return neighbor_table.open_neighbor_table(cfg, root, split), prepared.open_references(root)


def missing_neighbors_message(cfg, root: str) -> str:
  """Why memory training cannot start without a neighbor table, and what to run."""
  if is_rag_reader(cfg):
    why = "train.reader='rag' reads the references mined for each chunk"
    instead = ""
  elif cfg.train.stage == "continual":
    why = "train.stage='continual' trains with memory"
    instead = ""
  else:
    why = f"train.use_memory=True in train.stage={cfg.train.stage!r} trains with memory"
    instead = "; or drop train.use_memory=True to train without memory"
  todo = "`m3jax mine-neighbors` with the same --config and --workdir"
  if not os.path.isdir(workspace.index_dir_of_root(root)):
    todo = "`m3jax build-index`, then " + todo
  return (f"{workspace.neighbors_dir(root, 'train')}: no neighbor table, but {why}: run "
          f"{todo} first{instead}")


def post_training_loader(ctx: RunContext, root: str, split: str, **kwargs):
  """Loader over the chat (sft) or preference (dpo) dataset that prepare-chat wrote."""
  stage = chat_data.CHAT_STAGE if ctx.cfg.train.stage == "sft" else chat_data.PREFERENCE_STAGE
  if not os.path.isfile(os.path.join(root, stage, "stage.json")):
    raise InputError(f"{os.path.join(root, stage)}: no {stage} dataset; run "
                     "`m3jax prepare-chat` with data.chat_files / data.preference_files")
  source = chat_data.PostTrainSource(chat_data.dataset_dir(root, stage), split)
  if source.seq_len != ctx.cfg.model.max_seq_len:
    raise InputError(f"{source.path}: sequences have {source.seq_len} tokens but "
                     f"model.max_seq_len={ctx.cfg.model.max_seq_len}; rerun prepare-chat")
  memory = {}
  if ctx.use_memory:
    memory = dict(neighbors=chat_data.RecordNeighbors(source),
                  references=prepared.open_references(root))
  cfg = ctx.cfg
  return loader_lib.Loader(source, global_batch_size=cfg.data.batch_size, seed=cfg.seed,
                           sharding=ctx.batch_sharding, worker_count=cfg.data.worker_count,
                           **memory, **kwargs)


def make_train_loader(ctx: RunContext, root: str):
  if ctx.cfg.train.stage in POST_STAGES:
    return post_training_loader(ctx, root, "train", shuffle=bool(ctx.cfg.data.shuffle))
  neighbors = references = None
  transforms = []
  rag = is_rag_reader(ctx.cfg)
  if ctx.use_memory or rag:
    inputs = memory_inputs(ctx.cfg, root, "train")
    if inputs is None:
      raise FileNotFoundError(missing_neighbors_message(ctx.cfg, root))
    neighbors, references = inputs
  if rag:
    transforms.append(rag_contexts(ctx.cfg, root))
  return loader_lib.make_loader(ctx.cfg, root, split="train", sharding=ctx.batch_sharding,
                                neighbors=neighbors, references=references,
                                transforms=transforms)


def rag_contexts(cfg, root: str) -> rag_reader.RagContexts:
  """The RAG reader's record builder for this config and data root."""
  sep = rag_lib.encode_separator(prepared.open_tokenizer(root), str(cfg.train.rag_separator))
  mc = config_lib.model_config(cfg)
  length = rag_reader.context_length(mc.max_seq_len, mc.max_seq_len // mc.chunk_length,
                                     mc.reference_length, len(sep))
  return rag_reader.RagContexts(bos_id=mc.bos_id, pad_id=mc.pad_id, separator=sep,
                                length=length)


def tokens_per_step_of(cfg, root: str) -> int:
  """Tokens one training step runs through the model (a RAG reader's whole contexts)."""
  if is_rag_reader(cfg):
    return cfg.data.batch_size * rag_contexts(cfg, root).length
  return cfg.data.batch_size * cfg.model.max_seq_len


def evaluate(ctx: RunContext, params: Any, root: str, eval_plain: Callable,
             eval_mem: Callable | None) -> dict[str, float]:
  """Held-out loss/perplexity without memory and, when neighbors exist, with memory.

  Without memory, a memory-trained model keeps its `<s>Reference:` sink prefix with
  every memory masked. With memory, chunk c reads the neighbors mined for chunks
  before it (`neighbor_table.PrecedingNeighbors`): its memories are retrieved with
  text that precedes it, as in generation, never with the tokens being scored. A
  one-chunk sequence thus has no memory, and its loss equals the no-memory loss.
  """
  if ctx.cfg.train.stage in POST_STAGES:
    return _evaluate_post_training(ctx, params, root, eval_plain, eval_mem)
  out: dict[str, float] = {}
  n = int(ctx.cfg.train.eval_batches)
  modes = [("eval/no_memory", eval_plain, None)]
  inputs = memory_inputs(ctx.cfg, root, "validation") if eval_mem is not None else None
  if inputs is not None:
    modes.append(("eval/memory", eval_mem,
                  (neighbor_table.PrecedingNeighbors(inputs[0]), inputs[1])))
  for name, fn, inp in modes:
    loader = loader_lib.make_loader(
        ctx.cfg, root, split="validation", sharding=ctx.batch_sharding, num_epochs=1,
        shuffle=False, neighbors=inp[0] if inp else None, references=inp[1] if inp else None)
    loss_sum, tokens, mass = 0.0, 0.0, []
    for i, batch in enumerate(loader):
      if i >= n:
        break
      r = jax.device_get(fn(params, batch))
      loss_sum += float(r["loss_sum"])
      tokens += float(r["tokens"])
      if "memory_attention_mass" in r:
        mass.append(float(r["memory_attention_mass"]))
    if tokens:
      out[f"{name}/loss"] = loss_sum / tokens
      out[f"{name}/perplexity"] = float(np.exp(min(loss_sum / tokens, 50.0)))
    if mass:
      out[f"{name}/memory_attention_mass"] = float(np.mean(mass))
  return out


def _evaluate_post_training(ctx: RunContext, state_or_params: Any, root: str,
                            eval_plain: Callable, eval_mem: Callable | None) -> dict[str, float]:
  """SFT: held-out chat loss on assistant tokens (with the run's memory setting).
  DPO: held-out preference accuracy, reward margin and loss against the reference."""
  loader = post_training_loader(ctx, root, "validation", num_epochs=1, shuffle=False)
  n = int(ctx.cfg.train.eval_batches)
  sums: dict[str, float] = {}
  for i, batch in enumerate(loader):
    if i >= n:
      break
    if ctx.cfg.train.stage == "dpo":
      r = eval_plain(state_or_params.params, state_or_params.ref_params, batch)
    else:
      fn = eval_mem if ctx.use_memory else eval_plain
      r = fn(state_or_params.params, batch)
    for k, v in jax.device_get(r).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  if ctx.cfg.train.stage == "dpo":
    pairs = max(sums.pop("pairs", 0.0), 1.0)
    return {f"eval/dpo/{k}": v / pairs for k, v in sums.items()}
  tokens = max(sums.get("tokens", 0.0), 1.0)
  loss = sums.get("loss_sum", 0.0) / tokens
  return {"eval/sft/loss": loss, "eval/sft/perplexity": float(np.exp(min(loss, 50.0)))}


# ------------------------------------------------------------------------ state


def model_diff(old: config_lib.ModelConfig, new: config_lib.ModelConfig) -> str:
  """`model.a: x -> y; model.b: ...`: the fields that make two models different."""
  return "; ".join(artifacts.dict_diff(old.identity(), new.identity(), "model."))


def _load_init_params(cfg, ctx: RunContext) -> Any:
  """Parameters of `train.init_from` (warmup run), checked against this model."""
  path = cfg.train.init_from
  if not path and cfg.train.stage in POST_STAGES:
    raise config_lib.ConfigError(f"config field `train.init_from`: train.stage="
                                 f"{cfg.train.stage!r} starts from a trained checkpoint (the "
                                 "continual run for sft, the sft run for dpo)")
  if "://" not in path and not os.path.exists(path):
    raise InputError(f"config field `train.init_from`: {path} does not exist; give a "
                     "finished warmup workdir, its checkpoints/ or a params directory")
  src_cfg, params, step = params_io.load_for_inference(path, shardings=ctx.state_shardings.params)
  src = config_lib.model_config(src_cfg)
  if src.fingerprint() != ctx.model_config.fingerprint():
    raise InputError(f"config field `train.init_from`: {path} holds another model "
                     f"({model_diff(src, ctx.model_config)}); match these model fields")
  _say(f"train: initialising parameters from {path} (step {step})")
  return params


def check_run_config(cfg, workdir: str, has_checkpoint: bool) -> None:
  """Refuses a workdir whose checkpoints belong to another model, naming each field.

  `config.json` is written only after a run's first step (`write_run_config`), and a
  workdir without a checkpoint holds nothing to resume: a failed first start never
  pins the model, so a changed model is accepted there.
  """
  path = workspace.config_file(workdir)
  if not (has_checkpoint and os.path.exists(path)):
    return
  old = config_lib.model_config(config_lib.config_from_json(path))
  new = config_lib.model_config(cfg)
  if old.fingerprint() != new.fingerprint():
    raise InputError(f"--workdir={workdir} holds checkpoints of another model "
                     f"({model_diff(old, new)}); use a new --workdir, or the same model "
                     "fields to resume it")


def write_run_config(cfg, workdir: str) -> None:
  """Saves the resolved config as `config.json` (process 0)."""
  if jax.process_index() == 0:
    config_lib.save_config(cfg, workspace.config_file(workdir))


def _initial_state(cfg, ctx: RunContext, workdir: str, checkpointer, loader) -> Any:
  """The newest checkpoint's state (and data position), else a fresh or `init_from` state."""
  latest = checkpointer.latest_step()
  check_run_config(cfg, workdir, has_checkpoint=latest is not None)
  if latest is not None:
    restored = checkpointer.restore(latest, abstract_state_with_shardings(ctx))
    if restored.data_state is not None:
      loader.set_state(restored.data_state)
    _say(f"train: resumed from {checkpointer.step_dir(latest)}")
    return restored.state
  post = cfg.train.stage in POST_STAGES  # these start from a checkpoint (checked there)
  params = _load_init_params(cfg, ctx) if cfg.train.init_from or post else None
  state = init_state(ctx, jax.random.key(int(cfg.seed)), params)
  if ctx.mesh.shape["fsdp"] * ctx.mesh.shape["tensor"] > 1:  # data-parallel replicates
    sharding_lib.check_sharded(state.params)
  return state


# ------------------------------------------------------------------------ loop


def train(cfg: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None,
          stop_after: int | None = None, progress_every_s: float = 30.0) -> dict[str, float]:
  """Trains until `train.steps` (or `max_steps`); returns the last logged metrics.

  stop_after: leave after this many steps of THIS invocation (tests, time-boxed
  jobs), checkpointing first as a preemption would. Every log line ends with the
  rate, elapsed time and ETA; between log lines a `train: 1200/10000 steps ...` line
  comes every `progress_every_s` seconds.
  """
  config_lib.validate(cfg)
  workdir = os.path.abspath(workdir)
  artifacts.check_writable_dir(workdir, "--workdir")
  ctx = build_context(cfg)
  t = cfg.train
  total_steps = int(max_steps or t.steps)
  root = workspace.data_root(cfg, workdir)

  loader = make_train_loader(ctx, root)  # missing data is refused before anything is written
  checkpointer = ckpt_lib.Checkpointer.for_workdir(workdir, cfg)
  try:
    state = _initial_state(cfg, ctx, workdir, checkpointer, loader)
    train_fn, eval_plain, eval_mem = compile_steps(ctx)
  except BaseException:
    checkpointer.close()  # its background threads must not outlive a failed start
    raise
  n_devices = jax.device_count()
  peak, peak_src = hardware.peak_flops_per_device(float(t.peak_flops_per_device))
  flops_per_token = costs.train_flops_per_token(
      ctx.model_config, use_memory=ctx.use_memory,
      grad_through_references=bool(t.grad_through_references))
  tokens_per_step = tokens_per_step_of(cfg, root)
  if t.stage == "dpo":  # a chosen and a rejected sequence per pair, and the reference's
    tokens_per_step *= 2  # forward pass (a third of a forward + backward) on both
    flops_per_token *= 4 / 3
  _say(f"train: stage={t.stage} memory={'on' if ctx.use_memory else 'off'}"
       f"{' reader=rag (references as text)' if is_rag_reader(cfg) else ''} mesh="
       f"{dict(ctx.mesh.shape)} devices={n_devices} tokens/step={tokens_per_step} "
       f"MFU peak={peak:.3g} FLOP/s/device ({peak_src}); tok/s and MFU over the last "
       f"{int(t.throughput_window)} steps")

  writer = metrics_lib.MetricWriter(workdir)
  acc = metrics_lib.MetricAccumulator(last=("lr",))
  guard = PreemptionGuard(sync_every=int(t.log_every)).install()
  step = int(jax.device_get(state.step))
  start_step, last_log_time, last_log_step = step, time.perf_counter(), step
  progress = Progress(total_steps, desc="train", unit="steps", every_s=progress_every_s,
                      initial=step, enabled=jax.process_index() == 0)
  window = metrics_lib.StepTimeWindow(int(t.throughput_window))
  train_seconds = 0.0  # step time since the first (compiling) step, eval/checkpoints excluded
  logged: dict[str, float] = {}
  try:
    while step < total_steps:
      batch = next(loader)
      with sharding_lib.use_mesh(ctx.mesh, ctx.rules):
        state, m = train_fn(state, batch)
      step += 1
      acc.add(m)
      if step == start_step + 1:  # keep compilation out of the step-time figures
        jax.block_until_ready(m)
        last_log_time, last_log_step = time.perf_counter(), step
        write_run_config(cfg, workdir)  # the run has started: its config now describes it
        progress.mark(step)  # the rate and ETA leave compilation out
        window.mark(step, train_seconds)
      if step % int(t.log_every) == 0 or step == total_steps:
        values = acc.fetch()  # waits for the device only here
        now = time.perf_counter()
        if step > last_log_step:
          train_seconds += now - last_log_time
          window.mark(step, train_seconds)
        last_log_time, last_log_step = now, step
        dt = window.seconds_per_step() or 0.0
        values["perplexity"] = float(np.exp(min(values["loss"], 50.0)))
        values["step_time_s"] = dt  # over the last train.throughput_window steps
        values["tokens_per_s"] = tokens_per_step / dt if dt else 0.0
        values["mfu"] = values["tokens_per_s"] * flops_per_token / (peak * n_devices)
        logged = {f"train/{k}": v for k, v in values.items()}
        writer.write_scalars(step, logged)
        _say(f"step {step}/{total_steps} loss {values['loss']:.4f} lr {values.get('lr', 0):.2e} "
             f"gnorm {values['grad_norm']:.3f} {values['tokens_per_s']:.0f} tok/s "
             f"mfu {values['mfu']:.1%}" +
             (f" mem_share {values['memory_chunk_share']:.2f} mem_mass "
              f"{values.get('memory_attention_mass', float('nan')):.3f}"
              if ctx.use_memory and "memory_chunk_share" in values else "") +
             (f" margin {values['reward_margin']:.4f} pref_acc "
              f"{values['preference_accuracy']:.3f}" if "reward_margin" in values else "") +
             f" | {progress.mark(step)}")
      else:
        progress.set(step)
      if int(t.eval_every) and (step % int(t.eval_every) == 0 or step == total_steps):
        ev = evaluate(ctx, state if t.stage in POST_STAGES else state.params, root,
                      eval_plain, eval_mem)
        writer.write_scalars(step, ev)
        logged.update(ev)
        _say("eval " + " ".join(f"{k}={v:.4f}" for k, v in sorted(ev.items())))
      stopping = guard.should_stop(step) or (
          stop_after is not None and step - start_step >= stop_after)
      if step % int(t.checkpoint_every) == 0 or step == total_steps or stopping:
        checkpointer.save(step, state, loader.get_state(), {"stage": t.stage})
      if stopping:
        _say(f"train: stopping at step {step} (checkpoint saved)")
        break
      if last_log_step == step:  # eval and checkpoint time is not step time
        last_log_time = time.perf_counter()
  finally:
    guard.uninstall()
    checkpointer.close()
    writer.close()
  return logged
