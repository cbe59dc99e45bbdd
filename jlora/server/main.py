"""`jlora serve`: the gRPC server (health, reflection, API key, TLS / mutual TLS, drain)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jlora.async_engine import AsyncEngine
from jlora.server import jlora_pb2 as pb
from jlora.server import jlora_pb2_grpc as pb_grpc
from jlora.server.servicer import JloraServicer

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Jlora"].full_name
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclasses.dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    api_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients must present a certificate signed by this CA
    max_message_bytes: int = 16 << 20
    max_queue: int = 256
    grace_seconds: float = 10.0
    adapter_root: str | None = None
    model_name: str = "smollm2-135m"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, key: str):
        self.expected = f"Bearer {key}"

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if metadata.get("authorization") == self.expected:
            return await continuation(details)
        return _deny(details.method)


def _deny(method: str):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        yield  # pragma: no cover

    if method.endswith("GenerateStream"):
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


class JloraServer:
    """Owns the grpc.aio server, the health service and the drain sequence."""

    def __init__(self, front: AsyncEngine, options: ServerOptions):
        self.front = front
        self.options = options
        self.servicer = JloraServicer(front, options.model_name, options.adapter_root)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> int:
        o = self.options
        interceptors = [ApiKeyInterceptor(o.api_key)] if o.api_key else []
        msg = [
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.max_receive_message_length", o.max_message_bytes),
        ]
        self.server = grpc.aio.server(interceptors=interceptors, options=msg)
        pb_grpc.add_JloraServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{o.host}:{o.port}"
        if o.tls_cert:
            with open(o.tls_key, "rb") as f:
                key = f.read()
            with open(o.tls_cert, "rb") as f:
                cert = f.read()
            ca = None
            if o.tls_client_ca:
                with open(o.tls_client_ca, "rb") as f:
                    ca = f.read()
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def drain(self, grace: float | None = None) -> None:
        """Refuse new work (UNAVAILABLE, health NOT_SERVING), let in-flight requests finish, stop."""
        self.servicer.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = asyncio.get_running_loop().time() + (
            self.options.grace_seconds if grace is None else grace
        )
        while self.front.num_active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await self.server.stop(max(0.0, deadline - asyncio.get_running_loop().time()))

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve(front: AsyncEngine, options: ServerOptions) -> None:
    server = JloraServer(front, options)
    port = await server.start()
    log.info("serving on %s:%s", options.host, port)
    print(f"jlora: serving {options.model_name} on {options.host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("jlora: draining", flush=True)
    await server.drain()
    front.shutdown()
