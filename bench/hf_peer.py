"""HF transformers (+ PEFT) peer for decode-7b: random-weight Llama-2-7B geometry, bf16, greedy.

python -m bench.hf_peer --out FILE [--batch 32 --prompt 128 --new 128 --peft-new 16]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--peft-new", type=int, default=16, help="new tokens for the (slow) PEFT mixed run")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (args.batch, args.prompt), device="cuda")
    mask = torch.ones_like(ids)

    def timed(m, new, **kw):
        with torch.no_grad():
            m.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, do_sample=False, **kw)
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = m.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw
            )
            torch.cuda.synchronize()
        assert out.shape[1] == args.prompt + new
        return args.batch * new / (time.perf_counter() - start)

    result = {"hf_base_tok_s": timed(model, args.new)}
    names = [f"a{i}" for i in range(args.batch)]
    lcfg = dict(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, LoraConfig(**lcfg), adapter_name=names[0])
    for n in names[1:]:
        peft_model.add_adapter(n, LoraConfig(**lcfg))
    peft_model = peft_model.to(torch.bfloat16).eval()
    peft_model.set_adapter(names[0])
    result["hf_peft_one_adapter_tok_s"] = timed(peft_model, args.new)
    result["hf_peft_mixed_tok_s"] = timed(peft_model, args.peft_new, adapter_names=names)
    result["hf_peft_mixed_new_tokens"] = args.peft_new
    result["torch"] = torch.__version__
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(result)


if __name__ == "__main__":
    main()
