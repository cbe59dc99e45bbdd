"""A table of bench.mixed_step result files side by side, for an A/B call's output: each file's LoRA
fields or XLA flags, its decode and chunk step medians (ms, and the fraction of their floor) and the
LoRA kernels' time a step (BGMV/SGMV/by-adapter launches summed from the profiles).

python -m bench.step_summary bench/results/mixed-step-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# LoRA launches by name: BGMV (bgmv_by_adapter_* included), SGMV, a mixed step's one launch for both
LORA_KERNELS = ("bgmv", "sgmv", "mixed_lora")


def lora_ms(profile: dict | None) -> float | None:
    """The LoRA launches' ms a step in a profile's top kernels (None without a profile)."""
    if not profile:
        return None
    return sum(row["ms_per_step"] for row in profile["top"] if row["kernel"].startswith(LORA_KERNELS))


def summary_row(result: dict, name: str | None = None) -> dict:
    """One result's figures: name (its file's, if given), what it varied (LoRA fields, XLA flags) and
    its adapters' ranks, decode/chunk medians and floor fractions, LoRA ms."""
    workload = result.get("workload", {})
    varied = workload.get("lora_fields") or result.get("xla_flags") or "-"
    ranks = sorted(set(workload.get("adapter_ranks", [])))
    row = {"name": name or result["name"], "varied": varied, "ranks": ",".join(map(str, ranks)) or "-"}
    for kind in ("decode", "chunk"):
        part = result.get(kind) or {}
        row[f"{kind}_ms"] = part.get("median_ms")
        row[f"{kind}_floor"] = part.get("roofline_fraction")
    row["decode_lora_ms"] = lora_ms(result.get("decode_profile"))
    row["chunk_lora_ms"] = lora_ms(result.get("profile"))
    return row


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["decode ms (floor)  LoRA | chunk ms (floor)  LoRA | ranks | name  varied"]
    for r in rows:
        lines.append(
            f"{_fmt(r['decode_ms'], '7.3f')} ({_fmt(r['decode_floor'], '.3f')}) {_fmt(r['decode_lora_ms'], '5.3f')}"
            f" | {_fmt(r['chunk_ms'], '7.3f')} ({_fmt(r['chunk_floor'], '.3f')}) {_fmt(r['chunk_lora_ms'], '5.3f')}"
            f" | {r['ranks']} | {r['name']}  {r['varied']}"
        )
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    rows = [summary_row(json.loads(Path(p).read_text()), Path(p).stem) for p in sorted(paths)]
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
