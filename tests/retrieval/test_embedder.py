"""Embedders: deterministic, normalised, fixed width; lexical ranks rare-word matches first."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from m3jax.core import artifacts
from m3jax.core.config import model_config
from m3jax.model import transformer as model_lib
from m3jax.retrieval.embedder import EmbedderError
from m3jax.retrieval.embedder_factory import load_embedder
from m3jax.retrieval.lexical_embedder import LexicalEmbedder
from m3jax.retrieval.model_embedder import ModelEmbedder

REFERENCES = [
    "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity.",
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Zorvath glacier in the Kelmari range retreats forty metres every year.",
    "Tokyo is the capital of Japan and one of the most populous cities in the world.",
    "The cat sat on the mat and the dog slept by the door of the house.",
    "Quarnish merchants traded saffron and copper along the Velloran coast.",
    "The mitochondrion is the powerhouse of the cell and makes ATP.",
]


def _fitted(dim=64):
  return LexicalEmbedder(dim=dim).fit(REFERENCES)


def test_lexical_vectors_are_normalised_and_sized():
  e = _fitted(dim=96)
  x = e.embed(REFERENCES + ["", "!!!"])
  assert x.shape == (len(REFERENCES) + 2, 96) and x.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(x[:-2], axis=1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(x[-2:], 0.0)  # no words: the zero vector
  assert e.dim == 96


@pytest.mark.slow
def test_lexical_is_deterministic_across_processes(tmp_path):
  # Python's str hash is salted per process; the embedder must not depend on it.
  code = ("import numpy as np, sys; from m3jax.retrieval.lexical_embedder import LexicalEmbedder; "
          f"e = LexicalEmbedder(dim=32).fit({REFERENCES!r}); "
          f"np.save(sys.argv[1], e.embed({REFERENCES[:3]!r})); print(e.fingerprint())")
  outs = []
  for seed in ("1", "2"):
    path = tmp_path / f"x{seed}.npy"
    env = dict(os.environ, PYTHONHASHSEED=seed)
    fp = subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True,
                        capture_output=True, text=True).stdout.strip()
    outs.append((fp, np.load(path)))
  assert outs[0][0] == outs[1][0]
  np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_query_sharing_rare_words_ranks_its_reference_first():
  e = _fitted()
  refs = e.embed(REFERENCES)
  queries = {
      "Where do the Quarnish merchants sell their saffron?": 6,
      "How fast is the Zorvath glacier retreating?": 3,
      "What did Curie research?": 0,
      "tell me about the eiffel tower": 1,
  }
  scores = e.embed(list(queries)) @ refs.T
  np.testing.assert_array_equal(scores.argmax(axis=1), list(queries.values()))


def test_character_ngrams_match_inflections():
  e = _fitted(dim=256)
  refs = e.embed(REFERENCES)
  # "radioactive" never occurs, "radioactivity" does: only sub-word features link them.
  q = e.embed(["radioactive physicists"])
  assert (q @ refs.T).argmax() == 0


def test_idf_downweights_common_words():
  # In a corpus where "the" and "of" are everywhere, the one rare word decides,
  # although reference 5 repeats "the" many times.
  filler = [f"the item{i} of the group{i % 7} is the one" for i in range(200)]
  e = LexicalEmbedder(dim=256).fit(REFERENCES + filler)
  q = e.embed(["the the the the of the saffron"])
  assert (q @ e.embed(REFERENCES).T).argmax() == 6
  plain = LexicalEmbedder(dim=256)  # unfitted: every idf is 1
  assert (plain.embed(["the the the the of the saffron"]) @ plain.embed(REFERENCES).T
          ).argmax() == 5


def test_fingerprint_tracks_settings_and_fit():
  a, b = _fitted(dim=64), _fitted(dim=64)
  assert a.fingerprint() == b.fingerprint()
  assert _fitted(dim=32).fingerprint() != a.fingerprint()
  assert LexicalEmbedder(dim=64).fingerprint() != a.fingerprint()  # unfitted
  assert LexicalEmbedder(dim=64).fit(REFERENCES[:4]).fingerprint() != a.fingerprint()


def test_lexical_state_round_trip(tmp_path):
  e = _fitted()
  path = str(tmp_path / "embedder.npz")
  e.save(path)
  back = load_embedder(path)
  assert back.fingerprint() == e.fingerprint()
  np.testing.assert_array_equal(back.embed(REFERENCES), e.embed(REFERENCES))
  with open(path, "rb") as f:
    assert b"pickle" not in f.read()[:200]


def test_corrupt_or_missing_state_is_named(tmp_path):
  with pytest.raises(EmbedderError, match="does not exist"):
    load_embedder(str(tmp_path / "nope.npz"))
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(EmbedderError, match="bad.npz"):
    load_embedder(str(bad))


def test_bad_dim_is_rejected():
  with pytest.raises(EmbedderError, match="embed_dim"):
    LexicalEmbedder(dim=0)


# ---------------------------------------------------------------- model embedder

def _encode(text):
  return [5 + (ord(c) % 200) for c in text]


def _random_params(mc, seed=0):
  """Parameters of the right tree and shapes, drawn in numpy (skips a slow eager init)."""
  shapes = jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if "scale" in jax.tree_util.keystr(path):
      return np.ones(s.shape, np.float32)
    return (0.02 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def model_embedder(tiny_config):
  mc = model_config(tiny_config)
  return ModelEmbedder(mc, _random_params(mc), _encode, batch_size=4)


def test_model_embedder_vectors_are_normalised(model_embedder):
  x = model_embedder.embed(REFERENCES[:5] + [""])
  assert x.shape == (6, model_embedder.dim) and x.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(x[:5], axis=1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(x[5], 0.0)


def test_model_embedder_identical_texts_embed_identically(model_embedder):
  x = model_embedder.embed([REFERENCES[0], REFERENCES[1], REFERENCES[0]])
  np.testing.assert_array_equal(x[0], x[2])
  assert not np.allclose(x[0], x[1])


def test_model_embedder_is_batch_invariant(model_embedder):
  texts = REFERENCES[:7]  # two batches of 4, the second padded
  together = model_embedder.embed(texts)
  alone = np.concatenate([model_embedder.embed([t]) for t in texts])
  np.testing.assert_allclose(together, alone, atol=1e-6)
  shuffled = model_embedder.embed(texts[::-1])[::-1]
  np.testing.assert_allclose(together, shuffled, atol=1e-6)


def test_model_embedder_fit_state_round_trip(model_embedder, tmp_path):
  fitted = ModelEmbedder(model_embedder.model_config, model_embedder.params, _encode,
                         batch_size=4).fit(REFERENCES)
  assert fitted.fingerprint() != model_embedder.fingerprint()
  path = str(tmp_path / "model.npz")
  fitted.save(path)
  back = load_embedder(path, model_config=fitted.model_config, params=fitted.params,
                       encode=_encode)
  assert back.fingerprint() == fitted.fingerprint()
  np.testing.assert_allclose(back.embed(REFERENCES[:3]), fitted.embed(REFERENCES[:3]))
  with pytest.raises(EmbedderError, match="model embedder"):
    load_embedder(path)
  other_layer = ModelEmbedder(fitted.model_config, fitted.params, _encode, layer=0)
  with pytest.raises(EmbedderError, match="layer"):
    other_layer.load_state(path)


def test_params_id_is_the_params_fingerprint(model_embedder):
  params = model_embedder.params
  bumped = jax.tree.map(lambda a: a + 1e-3, params)
  assert model_embedder.params_id == artifacts.params_fingerprint(params)
  assert artifacts.params_fingerprint(params) != artifacts.params_fingerprint(bumped)


def test_state_of_other_params_asks_for_an_index_rebuild(model_embedder, tmp_path):
  # E.g. an index built before the params fingerprint was m3jax.core.artifacts'.
  old = ModelEmbedder(model_embedder.model_config, model_embedder.params, _encode,
                      batch_size=4, params_id="0123456789abcdef").fit(REFERENCES[:2])
  path = str(tmp_path / "old.npz")
  old.save(path)
  with pytest.raises(EmbedderError, match="embedder fingerprint .*rebuild the index") as e:
    load_embedder(path, model_config=old.model_config, params=old.params, encode=_encode)
  assert "\n" not in str(e.value)
