"""Regenerate the Python stubs from the .proto files with grpcio-tools.

    python -m protos.generate            # rewrite the committed stubs in place
    python -m protos.generate --out DIR  # write them under DIR instead (tests)

Run from anywhere: paths are resolved from this file. The .proto files are
compiled with the repository root as the include path, so the stubs import as
`protos.charstream.v1.generator_pb2` and their descriptors name the file
`protos/charstream/v1/generator.proto`.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ["protos/charstream/v1/generator.proto"]


def generate(out_dir: Path = REPO_ROOT, descriptor_set: Path | None = None) -> None:
    """Compile PROTO_FILES into `out_dir` (_pb2.py, _pb2_grpc.py, _pb2.pyi).

    With `descriptor_set`, also write the FileDescriptorSet protoc built.
    Raises RuntimeError when protoc reports an error.
    """
    from grpc_tools import protoc  # dev-only dependency: imported on use

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known types (google/protobuf/*.proto).
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
    ]
    if descriptor_set is not None:
        args.append(f"--descriptor_set_out={descriptor_set}")
    args += [str(REPO_ROOT / name) for name in PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILES}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    generate(args.out)
    for name in PROTO_FILES:
        stem = (args.out / name).with_suffix("")
        print(f"wrote {stem}_pb2.py, {stem}_pb2_grpc.py, {stem}_pb2.pyi")
    return 0


if __name__ == "__main__":
    sys.exit(main())
