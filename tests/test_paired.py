"""Before/after comparison: paired bootstrap intervals and better/worse samples."""

from __future__ import annotations

import pytest

from tunelab.eval.paired import bootstrap_difference, compare_replies


def test_bootstrap_of_a_constant_difference_is_exact():
    result = bootstrap_difference([1.0] * 20, [0.0] * 20)
    assert result == {"difference": 1.0, "ci95_low": 1.0, "ci95_high": 1.0}


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_samples():
    after = [1.0, 0.0] * 10
    before = [0.0] * 20
    small = bootstrap_difference(after, before)
    large = bootstrap_difference(after * 10, before * 10)
    assert small["difference"] == pytest.approx(0.5)
    assert small["ci95_low"] < 0.5 < small["ci95_high"]
    assert large["ci95_high"] - large["ci95_low"] < small["ci95_high"] - small["ci95_low"]


def test_compare_replies_lists_better_and_worse_samples():
    references = ["paris", "berlin", "rome"]
    after = ["paris", "berlin", "madrid"]
    before = ["london", "berlin", "rome"]
    result = compare_replies(["exact_match"], references, after, before, ["a:1", "a:2", "a:3"])
    assert result["differences"]["exact_match"]["difference"] == pytest.approx(0.0)
    assert [m["where"] for m in result["better"]] == ["a:1"]
    assert [m["where"] for m in result["worse"]] == ["a:3"]
