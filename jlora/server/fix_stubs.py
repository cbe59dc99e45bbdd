"""Post-process generated stubs so they load on older grpcio/protobuf runtimes (the GPU image's):
drop the generated version guards and use package-relative imports. Run by `make proto`."""

from __future__ import annotations

import re
import sys


def fix(pb2: str, grpc_file: str) -> None:
    text = open(pb2).read()
    text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", text)
    text = text.replace("from google.protobuf import runtime_version as _runtime_version\n", "")
    open(pb2, "w").write(text)
    text = open(grpc_file).read()
    text = text.replace("import jlora_pb2 as jlora__pb2", "from jlora.server import jlora_pb2 as jlora__pb2")
    text = re.sub(r"\nif _version_not_supported:\n    raise RuntimeError\((?:.|\n)*?\n    \)\n", "\n", text)
    open(grpc_file, "w").write(text)


if __name__ == "__main__":
    fix(sys.argv[1], sys.argv[2])
