"""The Flax Llama-family model with explicit state: forward(params, cache, batch) -> (cache, logits)."""
