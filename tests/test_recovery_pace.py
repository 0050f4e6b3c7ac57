"""benchmarks/recovery.py shares its time limit among the training runs, the curve's evaluations counted."""

import time

import pytest

pytest.importorskip("transformers")
from benchmarks.recovery import _Pace  # noqa: E402


@pytest.mark.parametrize("curve_seconds_per_token, expected", [(0.0, 100_000), (1e-3, 50_000)])
def test_tokens_fit_the_deadline_with_the_curve_evaluations(curve_seconds_per_token, expected):
    pace = _Pace(time.perf_counter() + 100.0, training_recipes=1, evaluation_seconds=0.0,
                 curve_seconds_per_token=curve_seconds_per_token)
    pace.seconds_per_token = 1e-3
    tokens = pace.tokens(10**9, patterns_left=1, reconstruction_seconds=0.0)
    assert 0.99 * expected < tokens <= expected
