"""Making and loading embedders: from a config (`data.embedder`) or a saved state.

`make_embedder(cfg)` gives the unfitted embedder the config names;
`load_embedder(path)` rebuilds a saved one (an index keeps the state of the
embedder that built it); `embedder_settings` is what an index records about it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

from m3jax.core.config import ConfigError
from m3jax.retrieval import embedder as emb_lib
from m3jax.retrieval.embedder import EmbedderError
from m3jax.retrieval import model_embedder as model_emb
from m3jax.retrieval.lexical_embedder import LexicalEmbedder
from m3jax.retrieval.model_embedder import ModelEmbedder


def load_embedder(path: str, *, model_config: Any = None, params: Any = None,
                  encode: Callable[[str], Sequence[int]] | None = None,
                  tokenizer_hash: str = "") -> emb_lib.Embedder:
  """Rebuilds the embedder saved at `path` (a lexical state is self-contained;
  a model state needs the same model's config, params and tokenizer)."""
  z = emb_lib.read_state(path)
  kind = str(z["kind"])
  if kind == LexicalEmbedder.kind:
    return LexicalEmbedder._from_state(path, z)
  if kind == ModelEmbedder.kind:
    if model_config is None or params is None or encode is None:
      raise EmbedderError(f"embedder state {path!r} is for the model embedder: pass the "
                          "model config, params and tokenizer encode function")
    settings = json.loads(str(z["settings"]))
    model = ModelEmbedder(model_config, params, encode, layer=settings["layer"],
                        max_len=settings["max_len"], tokenizer_hash=tokenizer_hash)
    return model.load_state(path)
  raise EmbedderError(f"embedder state {path!r} has unknown kind {kind!r}")


def make_embedder(cfg: Any, *, params_dir: str | None = None,
                  tokenizer: Any = None) -> emb_lib.Embedder:
  """The (unfitted) embedder `cfg.data.embedder` names.

  "lexical" needs nothing else; "model" needs a params directory (`m3jax convert`
  or an exported checkpoint) and the tokenizer.
  """
  kind = cfg.data.embedder
  if kind == LexicalEmbedder.kind:
    return LexicalEmbedder.from_config(cfg)
  if kind == ModelEmbedder.kind:
    if not params_dir or tokenizer is None:
      raise ConfigError("config field `data.embedder`: 'model' needs --params (a params "
                        "directory of the trained model) and the workdir's tokenizer")
    inputs = model_emb.model_embedder_inputs(params_dir, tokenizer)
    return ModelEmbedder(inputs["model_config"], inputs["params"], inputs["encode"],
                         layer=int(cfg.data.get("embed_model_layer", -1)),
                         tokenizer_hash=inputs["tokenizer_hash"])
  raise ConfigError(f"config field `data.embedder`: must be 'lexical' or 'model', got {kind!r}")


def embedder_settings(embedder: emb_lib.Embedder) -> dict[str, Any]:
  """What, besides the fitted state, identifies an embedder (recorded by indexes)."""
  if isinstance(embedder, ModelEmbedder):
    return dict(kind=embedder.kind, layer=embedder.layer, max_len=embedder.max_len,
                model=embedder.model_config.fingerprint(), params=embedder.params_id)
  return dict(kind=embedder.kind, **dataclasses.asdict(embedder.settings))
