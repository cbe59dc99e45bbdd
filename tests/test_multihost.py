"""Two processes on this machine, 2 CPU devices each, joined by jax.distributed: one mixed-adapter
batch served over the 4-device mesh (process 0 schedules, process 1 follows) equals one device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

import jlora
from jlora import loader
from tests.test_sharding import ENGINE_KW, NAMES, config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one_device(tiny_tp, tmp_path):
    loaded, paths = tiny_tp
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 384, int(rng.integers(3, 16))).tolist() for _ in range(6)]
    use = [NAMES[i % len(NAMES)] for i in range(6)]
    engine_kw = dict(ENGINE_KW)
    spec = {"engine": engine_kw, "adapters": paths, "prompts": prompts, "use": use}
    with open(tmp_path / "spec.json", "w") as f:
        json.dump(spec, f)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.multihost_worker",
                str(i),
                str(port),
                loaded.source,
                str(tmp_path / "spec.json"),
                str(tmp_path / "out.json"),
            ],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    with open(tmp_path / "out.json") as f:
        got = json.load(f)
    one = jlora.Engine(loader.load(loaded.source, progress=False), config())
    for name, path in paths.items():
        one.load_adapter(name, path)
    params = jlora.SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, ignore_eos=True)
    want = one.generate(prompts, params, adapters=use)
    for g, w in zip(got, want):
        assert g["tokens"] == w.token_ids
        assert np.abs(np.array(g["logprobs"]) - np.array(w.logprobs)).max() < 1e-4
