"""One process of the two-process test (tests/test_multihost.py): 2 CPU devices each, joined by
jax.distributed into one 4-device mesh; process 0 generates, process 1 follows.

python -m tests.multihost_worker PROCESS_ID PORT MODEL_DIR ADAPTERS_JSON OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"


def main() -> None:
    process_id, port, model_dir, adapters_json, out_json = sys.argv[1:6]
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import jlora
    from jlora import multihost
    from jlora.config import EngineConfig, MeshConfig

    multihost.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    with open(adapters_json) as f:
        spec = json.load(f)
    config = EngineConfig(**spec["engine"])
    engine = jlora.Engine.from_pretrained(
        model_dir, progress=False, engine_config=config, mesh=MeshConfig(model=4)
    )
    if jax.process_index() == 0:
        for name, path in spec["adapters"].items():
            engine.load_adapter(name, path)
        params = jlora.SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, ignore_eos=True)
        outs = engine.generate(spec["prompts"], params, adapters=spec["use"])
        multihost.stop(engine.paged)
        with open(out_json, "w") as f:
            json.dump([{"tokens": o.token_ids, "logprobs": o.logprobs} for o in outs], f)
    else:
        multihost.follow(engine.paged)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
