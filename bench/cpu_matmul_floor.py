"""How fast cpu-smol could be on this CPU if a step were nothing but its matmuls (T8's ceiling).

SmolLM2-135M's weight matmuls alone - per layer q/k/v as one matmul, o, gate/up as one, down; then the
tied lm_head - timed through XLA at the workload's shapes: decode (8 rows, 64 steps) and prefill (512
rows, once), with the weights stored [in, out] (as the engine does) and [out, in]. No attention, no
LoRA, no norms, no sampling, no host work. The sum bounds jlora's tok/s from above; divided by an HF PEFT
figure measured in the same run (bench.cpu_smol's peer, unless --peer-tok-s gives one) it bounds the
T8 ratio.

python -m bench.cpu_matmul_floor [--peer-tok-s TOK_S]
"""

from __future__ import annotations

import argparse

import numpy as np

BATCH, PROMPT, NEW = 8, 64, 64  # cpu-smol (bench/cpu_smol.py)


def shapes(config) -> list[tuple[int, int]]:
    """One layer's weight matmuls as (in, out), projections that share an input joined."""
    h, f = config.hidden_size, config.intermediate_size
    return [(h, config.q_dim + 2 * config.kv_dim), (config.q_dim, h), (h, 2 * f), (f, h)]


def layer_stack(config, rows: int, out_in: bool):
    """The time of every layer's matmuls for `rows` input rows, chained so that none is skipped."""
    import jax
    import jax.numpy as jnp

    from bench.kernels.timing import best_wall_seconds

    rng = np.random.default_rng(0)
    h, f = config.hidden_size, config.intermediate_size

    def weight(k: int, n: int):
        w = rng.standard_normal((n, k) if out_in else (k, n), dtype=np.float32) * 0.02
        return jax.device_put(w)

    layers = [[weight(k, n) for k, n in shapes(config)] for _ in range(config.num_hidden_layers)]
    mm = (lambda x, w: jnp.einsum("mk,nk->mn", x, w)) if out_in else (lambda x, w: x @ w)

    @jax.jit
    def run(x, layers):
        for qkv, o, gate_up, down in layers:
            x = x + mm(mm(x, qkv)[:, : config.q_dim], o)
            g = mm(x, gate_up)
            x = x + mm(jax.nn.silu(g[:, :f]) * g[:, f:], down)
        return x

    x = jnp.full((rows, h), 0.01, jnp.float32)
    return best_wall_seconds(lambda: run(x, layers))


def lm_head(config, rows: int) -> float:
    import jax
    import jax.numpy as jnp

    from bench.kernels.timing import best_wall_seconds

    emb = jax.device_put(
        np.random.default_rng(1).standard_normal((config.vocab_size, config.hidden_size), np.float32)
    )
    run = jax.jit(lambda x, e: x @ e.T)
    x = jnp.full((rows, config.hidden_size), 0.01, jnp.float32)
    return best_wall_seconds(lambda: run(x, emb))


def peer_tok_s(repeats: int = 3) -> float:
    """HF PEFT mixed-batch tok/s on the cpu-smol workload (bench.cpu_smol's peer)."""
    import tempfile

    from bench.cpu_smol import build_adapters, hf_model_and_prompts, run_peft

    hf, batch_prompts = hf_model_and_prompts()
    with tempfile.TemporaryDirectory() as folder:
        peft_model, names = build_adapters(hf, folder)
        return run_peft(peft_model, names, batch_prompts, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--peer-tok-s",
        type=float,
        default=None,
        help="HF PEFT mixed tok/s (default: measured here, as bench.cpu_smol does)",
    )
    args = ap.parse_args()
    if args.peer_tok_s is None:
        args.peer_tok_s = peer_tok_s()
        print(f"HF PEFT mixed batch: {args.peer_tok_s:.1f} tok/s", flush=True)
    from bench.common import write_result
    from checkpoints.gguf import GGUFFile
    from jlora.config import ModelConfig
    from jlora.loader import embedded_model_path

    config = ModelConfig.from_hf_dict(GGUFFile(embedded_model_path()).hf_config())
    tokens = BATCH * NEW
    out = {}
    for layout, out_in in (("in_out", False), ("out_in", True)):
        decode = layer_stack(config, BATCH, out_in) + lm_head(config, BATCH)
        prefill = layer_stack(config, BATCH * PROMPT, out_in) + lm_head(config, BATCH)  # sampled rows only
        total = prefill + (NEW - 1) * decode  # the prefill step samples the first token
        out[layout] = {
            "decode_step_ms": round(decode * 1e3, 2),
            "prefill_s": round(prefill, 3),
            "workload_s": round(total, 3),
            "tok_s_ceiling": round(tokens / total, 1),
        }
        out[layout]["T8_ratio_ceiling"] = round(tokens / total / args.peer_tok_s, 2)
        print(layout, out[layout], flush=True)
    path = write_result(
        "cpu-matmul-floor",
        {
            "workload": {
                "model": "SmolLM2-135M geometry",
                "dtype": "float32",
                "batch": BATCH,
                "prompt": PROMPT,
                "new_tokens": NEW,
                "what": "weight matmuls only",
            },
            "hf_peft_tok_s": round(args.peer_tok_s, 2),
            **out,
        },
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
