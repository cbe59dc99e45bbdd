"""bench.common's kernel-shape overrides: what a bench's --attention-tunables / --prefill-tunables replace."""

from __future__ import annotations

from types import SimpleNamespace

from bench.common import override_attention_tunables
from pallas_kernels.paged_attention import kernel as attention_kernel
from pallas_kernels.paged_attention import prefill_kernel


def test_attention_overrides_replace_both_kernels_shapes_and_only_those_asked(monkeypatch):
    monkeypatch.setattr(attention_kernel, "TUNED", dict(attention_kernel.TUNED))
    monkeypatch.setattr(prefill_kernel, "TUNED", dict(prefill_kernel.TUNED))
    decode0, prefill0 = attention_kernel.tunables_for(16, 128), dict(prefill_kernel.TUNED)
    override_attention_tunables(SimpleNamespace(attention_tunables=None, prefill_tunables=None))
    assert attention_kernel.tunables_for(16, 128) == decode0 and prefill_kernel.TUNED == prefill0
    override_attention_tunables(
        SimpleNamespace(attention_tunables='{"split_keys": 128}', prefill_tunables='{"min_programs": 64}')
    )
    assert attention_kernel.tunables_for(16, 128).split_keys == 128
    assert attention_kernel.tunables_for(16, 128).num_warps == decode0.num_warps
    assert {k: v.min_programs for k, v in prefill_kernel.TUNED.items()} == {k: 64 for k in prefill0}
    assert {k: v.block_queries for k, v in prefill_kernel.TUNED.items()} == {
        k: v.block_queries for k, v in prefill0.items()
    }
