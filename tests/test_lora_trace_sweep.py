"""bench.kernels.lora_trace_sweep's case: the tokens' pairs point at their adapters' rows, so the layer's
LoRA (reference path) equals the deltas computed from the adapters' rows directly."""

from __future__ import annotations

import numpy as np
import pytest

from bench.kernels import lora as bench_lora
from bench.kernels import lora_trace_sweep as sweep
from pallas_kernels.lora import LoraTunables


def test_shared_layer_case_matches_adapters_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_lora, "KERNEL_IMPL", "reference")
    ranks = [16, 2, 5]
    pool, rotations, bucket = sweep.shared_layer_case(7, ranks, np.random.default_rng(3))
    assert bucket == 16 and len(rotations) == sweep.ROT
    rows, _ = sweep.adapter_rows(ranks)
    p = np.asarray(pool[0], np.float32)
    h, u = sweep.H, sweep.UNITS
    for rot in rotations[:2]:
        x = np.asarray(rot[0], np.float32)
        got = np.asarray(bench_lora.decode_layer_op(LoraTunables(), bucket)(pool, *rot), np.float32)
        off_q = np.asarray(rot[4])[: len(x) + 1]  # q's offsets: each token's count of pairs is its rank
        adapters = [ranks.index(int(c)) for c in np.diff(off_q)]  # ranks are distinct here
        want = np.zeros((len(x), sweep.MEMBERS * h), np.float32)
        for t, s in enumerate(adapters):
            for m in range(sweep.MEMBERS):
                for a_unit, b_unit in rows[s][m]:
                    shrunk = x[t] @ p[a_unit : a_unit + u].reshape(h)
                    want[t, m * h : (m + 1) * h] += shrunk * p[b_unit : b_unit + u].reshape(h)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
        assert len(set(adapters)) > 1  # the tokens share several adapters


def test_variants_and_fields() -> None:
    best = LoraTunables(out_units=2)
    names = [name for name, _ in sweep.variants(best, 64)]
    assert names == ["best", "expand_lanes 16", "expand_lanes 32", "by adapter"]
    assert sweep.fields_changed(LoraTunables(), best) == {"out_units": 2}
    assert [name for name, _ in sweep.variants(best, 8)] == ["best"]
