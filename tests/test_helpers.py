"""The shared test helpers can fail: ``assert_same_tensors`` catches every kind of difference between state dicts."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_same_tensors


def _state() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(6, dtype=torch.float32).view(2, 3), "a.bias": torch.zeros(3),
            "steps": torch.tensor(4)}


def test_equal_state_dicts_pass_including_nan() -> None:
    a, b = _state(), _state()
    a["a.bias"][0] = b["a.bias"][0] = float("nan")
    assert_same_tensors(a, b)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("a.bias"), r"keys differ: only in the first \['a.bias'\]"),
    (lambda s: s.update(extra=torch.ones(1)), r"only in the second \['extra'\]"),
    (lambda s: s.update(steps=torch.tensor(4.0)), r"steps: dtype torch.int64 != torch.float32"),
    (lambda s: s.update({"a.bias": torch.zeros(1, 3)}), r"a.bias: shape \(3,\) != \(1, 3\)"),
    (lambda s: s["a.weight"].view(-1)[4].add_(1e-6), r"a.weight: 1 of 6 values differ"),
    (lambda s: s.update({"a.bias": [0.0, 0.0, 0.0]}), r"a.bias: not two tensors"),
], ids=["missing_key", "extra_key", "dtype", "shape", "one_value", "not_a_tensor"])
def test_each_difference_fails_naming_the_key(change, message: str) -> None:
    other = _state()
    change(other)
    with pytest.raises(AssertionError, match=message):
        assert_same_tensors(_state(), other)


def test_the_first_differing_key_is_named() -> None:
    a, b = _state(), _state()
    b["a.weight"] += 1
    b["steps"] += 1
    with pytest.raises(AssertionError, match="^model: a.weight:"):
        assert_same_tensors(a, b, "model")
