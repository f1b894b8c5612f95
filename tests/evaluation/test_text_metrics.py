"""Text metrics on known answers."""

import pytest

from m3jax.evaluation import text_metrics


@pytest.mark.parametrize("prediction,answer,want", [
    (" Ardenmere.\nQuestion: Where was", "Ardenmere", True),
    ("12 March 1990.", "12 March 1990", True),
    ("The University of Corvale", "university of corvale", True),
    ("Corvale University", "University of Corvale", False),
    ("", "x", False),
])
def test_exact_match_normalisation(prediction, answer, want):
  assert text_metrics.exact_match(prediction, answer) is want


def test_group_means_cover_every_group_and_all():
  got = text_metrics.group_means([1.0, 0.0, 1.0], ["seen", "seen", "unseen"])
  assert got == {"all": pytest.approx(2 / 3), "seen": 0.5, "unseen": 1.0}


def test_perplexity_from_a_summed_nll():
  got = text_metrics.perplexity_from(6.0, 3)
  assert got["tokens"] == 3 and got["nll"] == 2.0
  assert got["perplexity"] == pytest.approx(7.389056, rel=1e-6)
