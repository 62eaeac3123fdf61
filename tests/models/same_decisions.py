"""``assert_same_decisions``: two :class:`~otcclip.models.decisions.Decisions` agree in
every column, dtype, fit, model check and duplicates fall-back."""

from __future__ import annotations

import numpy as np

from otcclip.models.decisions import Decisions


def assert_same_decisions(got: Decisions, ref: Decisions) -> None:
    for name, v in vars(ref).items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(getattr(got, name), v, err_msg=name)
            assert getattr(got, name).dtype == v.dtype, name
    assert got.gmm == ref.gmm and got.model_quality == ref.model_quality
    assert got.dup_fallback.keys() == ref.dup_fallback.keys()
    for name, v in ref.dup_fallback.items():
        np.testing.assert_array_equal(got.dup_fallback[name], v, err_msg=name)
