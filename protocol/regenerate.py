"""Regenerate the committed Python stubs from `metaspec.proto` with grpcio-tools.

    python -m metaspec.protocol.regenerate

The .proto is compiled as `metaspec/protocol/metaspec.proto` so the generated gRPC module imports
`metaspec.protocol.metaspec_pb2` (an absolute import that works wherever the package is installed).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "metaspec.proto"
OUTPUTS = ("metaspec_pb2.py", "metaspec_pb2.pyi", "metaspec_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile PROTO into `out_dir` (the three OUTPUTS); returns their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "metaspec" / "protocol"
        src.mkdir(parents=True)
        shutil.copy(PROTO, src / PROTO.name)
        include = Path(protoc.__file__).parent / "_proto"
        args = ["protoc", f"-I{tmp}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", f"metaspec/protocol/{PROTO.name}"]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copy(src / name, out_dir / name)
    return [out_dir / name for name in OUTPUTS]


def main() -> int:
    for path in generate(HERE):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
