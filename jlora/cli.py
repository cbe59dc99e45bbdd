"""`jlora demo | generate | convert`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
]


def _engine(model: str, dtype: str):
    import jlora

    print(f"loading {model} ({dtype}) ...", flush=True)
    return jlora.Engine.from_pretrained(model, dtype=dtype)


def cmd_demo(args: argparse.Namespace) -> int:
    import jlora
    from checkpoints.peft import write_random_peft_adapter

    engine = _engine(args.model, args.dtype)
    params = jlora.SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    engine.chat(
        [{"role": "user", "content": "hi"}], jlora.SamplingParams(max_tokens=2, temperature=0.0)
    )  # compile
    for question in DEMO_QUESTIONS:
        start = time.perf_counter()
        out = engine.chat([{"role": "user", "content": question}], params)[0]
        seconds = time.perf_counter() - start
        print(
            f"\n> {question}\n{out.text.strip()}\n[{len(out.token_ids)} tokens, {len(out.token_ids) / seconds:.1f} tok/s]"
        )

    print("\n== one batch, a different LoRA adapter per request, beside a base-only request ==")
    c = engine.config
    with tempfile.TemporaryDirectory() as tmp:
        specs = [
            ("qv-r8", 8, ["q_proj", "v_proj"]),
            ("attn-r16", 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
            ("mlp-r32", 32, ["gate_proj", "up_proj", "down_proj"]),
        ]
        for i, (name, rank, targets) in enumerate(specs):
            path = write_random_peft_adapter(
                os.path.join(tmp, name),
                num_layers=c.num_hidden_layers,
                module_shapes=c.module_shapes(),
                rank=rank,
                alpha=2 * rank,
                target_modules=targets,
                seed=i,
                std=0.05,
            )
            engine.load_adapter(name, path)
        names = [None] + [s[0] for s in specs]
        convo = [{"role": "user", "content": "What is the capital of France?"}]
        start = time.perf_counter()
        outs = engine.chat([convo] * len(names), params, adapters=names)
        seconds = time.perf_counter() - start
        for name, out in zip(names, outs):
            print(f"[{name or 'base'}] {out.text.strip()[:100]!r}")
        total = sum(len(o.token_ids) for o in outs)
        print(
            f"[batch of {len(names)}: {total} tokens, {total / seconds:.1f} tok/s; adapters are random, so their answers drift]"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import jlora

    engine = _engine(args.model, args.dtype)
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        engine.load_adapter(name, path)
    params = jlora.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    prompts = args.prompt
    if args.chat:
        outs = engine.chat([[{"role": "user", "content": p}] for p in prompts], params, adapters=args.use)
    else:
        outs = engine.generate(prompts, params, adapters=args.use)
    for p, o in zip(prompts, outs):
        print(f"> {p}\n{o.text}\n[{o.finish_reason}, {len(o.token_ids)} tokens]")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from jlora.async_engine import AsyncEngine
    from jlora.server.main import ServerOptions, serve

    engine = _engine(args.model, args.dtype)
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        engine.load_adapter(name, path)
    options = ServerOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("JLORA_API_KEY"),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        max_message_bytes=args.max_message_bytes,
        max_queue=args.max_queue,
        grace_seconds=args.grace,
        adapter_root=args.adapter_root,
        model_name=args.model,
    )
    asyncio.run(serve(AsyncEngine(engine, max_queue=args.max_queue), options))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    engine = _engine(args.model, args.dtype)
    engine.save_checkpoint(args.output)
    print(f"saved {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jlora")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, positional_model: bool = False) -> None:
        if positional_model:
            p.add_argument("model", nargs="?", default="smollm2-135m")
        else:
            p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])

    demo = sub.add_parser("demo", help="answer a few chat prompts with the embedded model")
    common(demo)
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate for prompts, optionally with adapters")
    common(gen)
    gen.add_argument("--prompt", action="append", required=True)
    gen.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    gen.add_argument("--use", default=None, help="adapter name for every prompt")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the model and adapters over gRPC")
    common(srv, positional_model=True)
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=50051)
    srv.add_argument(
        "--api-key", default=None, help="clients send 'authorization: Bearer KEY' (or set JLORA_API_KEY)"
    )
    srv.add_argument("--tls-cert", default=None)
    srv.add_argument("--tls-key", default=None)
    srv.add_argument(
        "--tls-client-ca", default=None, help="require client certificates signed by this CA (mTLS)"
    )
    srv.add_argument("--max-message-bytes", type=int, default=16 << 20)
    srv.add_argument("--max-queue", type=int, default=256)
    srv.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    srv.add_argument("--adapter-root", default=None, help="LoadAdapter paths must lie inside this folder")
    srv.set_defaults(func=cmd_serve)

    conv = sub.add_parser("convert", help="convert a model to an orbax checkpoint folder")
    common(conv, positional_model=True)
    conv.add_argument("output")
    conv.set_defaults(func=cmd_convert)

    args = parser.parse_args(argv)
    from jlora.errors import JloraError

    try:
        return args.func(args)
    except JloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
