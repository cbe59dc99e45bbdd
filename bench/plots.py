"""PNG plots of a slora-trace result: throughput and SLO attainment against the number of adapters,
latency percentiles against the request rate. python -m bench.plots RESULT.json"""

from __future__ import annotations

import json
import os
import sys


def plot(path: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    with open(path) as f:
        result = json.load(f)
    runs, stem = result["runs"], os.path.splitext(path)[0]
    base_rate = result["workload"]["rate"]
    by_n = sorted((r for r in runs if r["rate"] == base_rate), key=lambda r: r["n"])
    title = f"{result['workload']['model']} on {result['device']}"
    out = []

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r["n"] for r in by_n]
    ax[0].plot(ns, [r["throughput_req_s"] for r in by_n], "o-")
    ax[0].set(
        xscale="log", xlabel="adapters (n)", ylabel="throughput (req/s)", title=f"rate {base_rate} req/s"
    )
    ax[0].set_ylim(bottom=0)  # a flat line must look flat
    ax[1].plot(ns, [r["slo_attainment"] for r in by_n], "o-", label="first token within 6 s")
    ax[1].plot(ns, [r["roofline_fraction"] for r in by_n], "s--", label="fraction of roofline")
    ax[1].set(xscale="log", xlabel="adapters (n)", ylim=(0, 1.05))
    ax[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.append(f"{stem}-adapters.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)

    sweep_n = by_n[0]["n"] if by_n else None
    sweep = sorted((r for r in runs if r["n"] == sweep_n), key=lambda r: r["rate"])
    if len(sweep) > 1:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        rates = [r["rate"] for r in sweep]
        for key, axis in (("ttft_s", ax[0]), ("e2e_s", ax[1])):
            for pct in ("p50", "p99"):
                axis.plot(rates, [r[key][pct] for r in sweep], "o-", label=pct)
            axis.set(xlabel="request rate (req/s)", ylabel=f"{key[:-2]} latency (s)", title=f"n = {sweep_n}")
            axis.legend()
        fig.suptitle(title)
        fig.tight_layout()
        out.append(f"{stem}-latency.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot(sys.argv[1]))
