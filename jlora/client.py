"""A small Python client over the generated stubs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc

from jlora.server import jlora_pb2 as pb
from jlora.server import jlora_pb2_grpc as pb_grpc


class Client:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_message_bytes: int = 16 << 20,
    ):
        opts = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb_grpc.JloraStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    @staticmethod
    def request(
        prompt: str | Sequence[int], adapter: str | None = None, chat: bool = False, **params
    ) -> pb.GenerateRequest:
        sp = pb.SamplingParams(**params)
        if isinstance(prompt, str):
            return pb.GenerateRequest(text=prompt, adapter=adapter or "", params=sp, chat=chat)
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(prompt)), adapter=adapter or "", params=sp)

    def generate(self, prompt, adapter=None, chat=False, timeout=None, **params) -> pb.GenerateResponse:
        return self.stub.Generate(
            self.request(prompt, adapter, chat, **params), timeout=timeout, metadata=self.metadata
        )

    def stream(
        self, prompt, adapter=None, chat=False, timeout=None, **params
    ) -> Iterator[pb.GenerateStreamResponse]:
        return self.stub.GenerateStream(
            self.request(prompt, adapter, chat, **params), timeout=timeout, metadata=self.metadata
        )

    def load_adapter(self, name: str, path: str) -> None:
        self.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=path), metadata=self.metadata)

    def unload_adapter(self, name: str) -> None:
        self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), metadata=self.metadata)

    def list_adapters(self) -> pb.ListAdaptersResponse:
        return self.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=self.metadata)

    def list_models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()
