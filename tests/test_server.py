"""The gRPC server over a real loopback channel, against SmolLM2: status codes, stream/unary/engine
agreement, seeded sampling, health and drain, reflection, path confinement, TLS, and a load test."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import threading
import time

import grpc
import pytest

import jlora
from checkpoints.peft import write_random_peft_adapter
from jlora import loader
from jlora.async_engine import AsyncEngine
from jlora.client import Client
from jlora.config import EngineConfig
from jlora.scheduler import SchedulerConfig
from jlora.server import jlora_pb2 as pb
from jlora.server.main import JloraServer, ServerOptions

KEY = "test-key"
GREEDY = dict(max_tokens=6, temperature=0.0, logprobs=True)


class Running:
    """A JloraServer on its own event loop thread."""

    def __init__(self, front: AsyncEngine, **options):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = JloraServer(front, ServerOptions(port=0, **options))
        self.port = self.call(self.server.start())

    def call(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.call(self.server.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    model = loader.load("smollm2-135m", progress=False)
    config = EngineConfig(
        max_model_len=512,
        num_pages=400,
        max_batch=8,
        decode_batch_buckets=(8,),
        prefill_batch_buckets=(8,),
        prefill_chunk_buckets=(16, 64),  # short prompts (the load test's) take the 16-token bucket
        page_buckets=(8,),
        lora_rank_buckets=(16,),
        lora_modules=("q_proj", "v_proj"),
    )
    sched = SchedulerConfig(
        max_batch=8, max_prefill_tokens=512, max_prefill_seqs=8, max_chunk=64, max_model_len=512
    )
    engine = jlora.Engine(model, config, scheduler_config=sched)
    root = tmp / "adapters"
    c = model.config
    for i in range(100):
        write_random_peft_adapter(
            root / f"ad{i}",
            num_layers=c.num_hidden_layers,
            module_shapes=c.module_shapes(),
            rank=4,
            alpha=8,
            target_modules=["q_proj", "v_proj"],
            seed=i,
            std=0.2,
        )
    for i in range(3):
        engine.load_adapter(f"ad{i}", str(root / f"ad{i}"))
    front = AsyncEngine(engine, max_queue=200)
    server = Running(front, api_key=KEY, adapter_root=str(root), max_queue=200, grace_seconds=30)
    client = Client(f"127.0.0.1:{server.port}", api_key=KEY)
    yield engine, front, server, client, root
    client.close()
    server.stop()
    front.shutdown()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_unary_stream_and_engine_agree_and_seeds_reproduce(setup):
    engine, _, _, client, _ = setup
    for adapter in (None, "ad1"):
        want = engine.generate(
            ["The capital of France is"], jlora.SamplingParams(**GREEDY), adapters=[adapter]
        )[0]
        unary = client.generate("The capital of France is", adapter=adapter, **GREEDY)
        chunks = list(client.stream("The capital of France is", adapter=adapter, **GREEDY))
        assert list(unary.token_ids) == want.token_ids and unary.text == want.text
        assert [c.token.token_id for c in chunks[:-1]] == want.token_ids
        assert "".join(c.token.text for c in chunks[:-1]) == want.text
        assert chunks[-1].finish.finish_reason == want.finish_reason
        assert chunks[-1].finish.usage.completion_tokens == len(want.token_ids)
    seeded = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a = client.generate("Once upon a time", adapter="ad2", **seeded)
    b = client.generate("Once upon a time", adapter="ad2", **seeded)
    assert list(a.token_ids) == list(b.token_ids)
    chat = client.generate("What is the capital of France?", chat=True, max_tokens=12, temperature=0.0)
    assert "Paris" in chat.text


def test_status_codes(setup, tmp_path):
    engine, _, _, client, root = setup
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.generate("", **GREEDY)) == invalid
    assert code_of(lambda: client.generate([1, 2, 10**6], **GREEDY)) == invalid
    assert code_of(lambda: client.generate([1, -2], **GREEDY)) == invalid
    assert code_of(lambda: client.generate([1] * 500, max_tokens=100)) == invalid
    assert code_of(lambda: client.generate("hi", temperature=-1.0)) == invalid
    assert code_of(lambda: client.generate("hi", top_p=2.0)) == invalid
    assert code_of(lambda: list(client.stream("", **GREEDY))) == invalid
    assert code_of(lambda: client.generate("hi", adapter="missing", **GREEDY)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: list(client.stream("hi", adapter="missing"))) == grpc.StatusCode.NOT_FOUND
    # bad adapter files: the reason comes back, the loaded adapters keep serving
    bad = root / "bad_pickle"
    shutil.copytree(root / "ad50", bad)
    (bad / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(grpc.RpcError) as info:
        client.load_adapter("bad", "bad_pickle")
    assert info.value.code() == invalid and "unpickled" in info.value.details()
    for escape in ("../..", "/etc", "ad1/../../x"):
        assert code_of(lambda e=escape: client.load_adapter("esc", e)) == invalid
    link = root / "link_out"
    if not link.exists():
        os.symlink(tmp_path, link)
    assert code_of(lambda: client.load_adapter("esc", "link_out")) == invalid
    assert code_of(lambda: client.load_adapter("bad name/x", "ad5")) == invalid
    assert code_of(lambda: client.unload_adapter("never")) == grpc.StatusCode.NOT_FOUND
    assert client.generate("hi", adapter="ad1", **GREEDY).token_ids
    # auth: wrong or missing key; health stays open
    for key in (None, "wrong"):
        other = Client(f"127.0.0.1:{setup[2].port}", api_key=key)
        assert code_of(lambda o=other: o.generate("hi", **GREEDY)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda o=other: o.list_adapters()) == grpc.StatusCode.UNAUTHENTICATED
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        status = health_pb2_grpc.HealthStub(other.channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        other.close()
    models = client.list_models().models
    assert models[0].vocab_size == 49152 and models[0].architecture == "llama"
    assert {"ad0", "ad1", "ad2"} <= {a.name for a in client.list_adapters().adapters}


def test_deadline_and_cancel_free_pages(setup):
    engine, front, _, client, _ = setup
    long = dict(max_tokens=400, temperature=0.0, ignore_eos=True)
    assert (
        code_of(lambda: client.generate("Tell me a long story", timeout=0.5, **long))
        == grpc.StatusCode.DEADLINE_EXCEEDED
    )
    stream = client.stream("Tell me a long story", **long)
    next(stream)
    next(stream)
    stream.cancel()
    deadline = time.time() + 10
    while (engine.paged.memory.page_tables or front.num_active) and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.paged.memory.page_tables and front.num_active == 0
    engine.paged.memory.check_invariants()


def test_queue_full_is_resource_exhausted(setup):
    _, front, running, client, _ = setup
    limit, front.max_queue = front.max_queue, 1  # one AsyncEngine per engine: adjust the shared front
    try:
        first = client.stub.Generate.future(
            Client.request("Tell me a story", max_tokens=60, temperature=0.0, ignore_eos=True),
            metadata=client.metadata,
        )
        time.sleep(0.3)
        assert code_of(lambda: client.generate("hi", **GREEDY)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(first.result().token_ids) == 60
    finally:
        front.max_queue = limit


def test_reflection_lists_the_service(setup):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    client = setup[3]
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"jlora.v1.Jlora", "grpc.health.v1.Health"} <= names


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_tls_and_mutual_tls(setup, tmp_path):
    front = setup[1]

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (tmp_path / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
        )
    read = lambda n: (tmp_path / n).read_bytes()  # noqa: E731
    server = Running(
        front,
        tls_cert=str(tmp_path / "server.pem"),
        tls_key=str(tmp_path / "server.key"),
        tls_client_ca=str(tmp_path / "ca.pem"),
    )
    try:
        good = Client(
            f"localhost:{server.port}",
            root_certificates=read("ca.pem"),
            private_key=read("client.key"),
            certificate_chain=read("client.pem"),
        )
        assert good.generate("hi", **GREEDY).token_ids
        no_cert = Client(f"localhost:{server.port}", root_certificates=read("ca.pem"))
        assert code_of(lambda: no_cert.generate("hi", **GREEDY)) == grpc.StatusCode.UNAVAILABLE
        good.close()
        no_cert.close()
    finally:
        server.stop()


def test_load_2000_requests_100_adapters_then_drain(setup):
    """2,000 requests over 100 adapters from 64 concurrent streams; a tenth cancelled or given short
    deadlines; 50 bad LoadAdapter calls in the middle. Bounded in count and time: about 3.5 minutes on
    the 2-core machine (the short prompts take the 16-token prefill bucket), so it runs in make test."""
    engine, front, server, client, root = setup
    for i in range(3, 100):
        engine.load_adapter(f"ad{i}", str(root / f"ad{i}"))
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at"]
    params = dict(max_tokens=3, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    plan = [
        (
            rng.randrange(4),
            f"ad{rng.randrange(100)}" if rng.random() < 0.9 else None,
            rng.choice(["ok"] * 18 + ["cancel", "deadline"]),
        )
        for _ in range(2000)
    ]

    combos = sorted({(p, a) for p, a, kind in plan if kind == "ok"}, key=str)
    expected = {}
    for i in range(0, len(combos), 8):  # the engine's own answers, 8 at a time
        batch = combos[i : i + 8]
        outs = engine.generate(
            [prompts[p] for p, _ in batch], jlora.SamplingParams(**params), adapters=[a for _, a in batch]
        )
        expected.update({c: o.token_ids for c, o in zip(batch, outs)})
    for c in combos[:6]:  # and alone, for a sample
        assert (
            engine.generate([prompts[c[0]]], jlora.SamplingParams(**params), adapters=[c[1]])[0].token_ids
            == expected[c]
        )

    from jlora.server import jlora_pb2_grpc as pb_grpc

    async def main():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.JloraStub(channel)
        md = (("authorization", f"Bearer {KEY}"),)
        queue = asyncio.Queue()
        for item in enumerate(plan):
            queue.put_nowait(item)
        results, bad_codes = {}, []

        async def worker():
            while not queue.empty():
                i, (p, adapter, kind) = queue.get_nowait()
                req = Client.request(prompts[p], adapter, **params)
                if i == len(plan) // 2:  # 50 bad LoadAdapter calls in the middle
                    for j in range(50):
                        try:
                            await stub.LoadAdapter(
                                pb.LoadAdapterRequest(name=f"bad{j}", path=["../x", "nope", "/"][j % 3]),
                                metadata=md,
                            )
                        except grpc.aio.AioRpcError as e:
                            bad_codes.append(e.code())
                try:
                    if kind == "ok":
                        results[i] = list((await stub.Generate(req, metadata=md, timeout=600)).token_ids)
                    elif kind == "deadline":
                        await stub.Generate(req, metadata=md, timeout=0.001)
                    else:
                        call = stub.GenerateStream(req, metadata=md)
                        await asyncio.sleep(0.001)
                        call.cancel()
                except grpc.aio.AioRpcError as e:
                    assert kind != "ok", e
                    assert e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(64))), timeout=1200)
        await channel.close()
        return results, bad_codes

    start = time.time()
    results, bad_codes = asyncio.run(main())
    assert bad_codes == [grpc.StatusCode.INVALID_ARGUMENT] * 50
    oks = [i for i, (_, _, kind) in enumerate(plan) if kind == "ok"]
    assert sorted(results) == oks
    for i in oks:
        p, a, _ = plan[i]
        assert results[i] == expected[(p, a)], i
    deadline = time.time() + 30
    while (front.num_active or engine.paged.memory.page_tables) and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.paged.memory.page_tables
    engine.paged.memory.check_invariants()
    assert client.generate("hi", **GREEDY).token_ids  # still healthy
    print(f"load test: {len(plan)} requests in {time.time() - start:.1f}s")

    # drain: in-flight requests finish, new ones get UNAVAILABLE, health says NOT_SERVING
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    inflight = client.stub.Generate.future(
        Client.request("Tell me a story", max_tokens=30, temperature=0.0, ignore_eos=True),
        metadata=client.metadata,
    )
    time.sleep(0.3)
    drained = asyncio.run_coroutine_threadsafe(server.server.drain(grace=60), server.loop)
    time.sleep(0.2)
    health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code_of(lambda: client.generate("hi", **GREEDY)) == grpc.StatusCode.UNAVAILABLE
    assert len(inflight.result(timeout=120).token_ids) == 30
    drained.result(timeout=120)
