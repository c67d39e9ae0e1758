"""The committed stubs match generator.proto, and the contract is documented and language-neutral."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from google.protobuf import descriptor_pb2  # noqa: E402

from protos import generate  # noqa: E402
from protos.charstream.v1 import generator_pb2, generator_pb2_grpc  # noqa: E402

PROTO = generate.PROTO_FILES[0]
STUB_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def _protoc_descriptor(tmp_path: Path, source_info: bool = False) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    out = tmp_path / ("with_source.pb" if source_info else "plain.pb")
    args = ["protoc", f"-I{generate.REPO_ROOT}", f"--descriptor_set_out={out}"]
    if source_info:
        args.append("--include_source_info")
    assert protoc.main(args + [str(generate.REPO_ROOT / PROTO)]) == 0
    file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file_proto,) = file_set.file
    return file_proto


def test_committed_stubs_describe_the_current_proto(tmp_path: Path) -> None:
    # Compares meaning, not bytes: holds whatever grpcio-tools version is installed.
    committed = descriptor_pb2.FileDescriptorProto.FromString(generator_pb2.DESCRIPTOR.serialized_pb)
    expected = _protoc_descriptor(tmp_path)
    # protoc's descriptor sets spell out json_name; generated code leaves it implicit.
    for message in expected.message_type:
        for field in message.field:
            field.ClearField("json_name")
    assert committed == expected, (
        f"{PROTO} changed but the stubs were not regenerated: run `python -m protos.generate`"
    )


def test_regenerated_stubs_are_byte_identical(tmp_path: Path) -> None:
    import grpc_tools

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    if version != generator_pb2_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(
            f"stubs were generated with grpcio-tools {generator_pb2_grpc.GRPC_GENERATED_VERSION}, "
            f"{version} is installed: byte comparison only holds for the same version"
        )
    generate.generate(tmp_path)
    stem = PROTO.removesuffix(".proto")
    for suffix in STUB_SUFFIXES:
        fresh = (tmp_path / f"{stem}{suffix}").read_text(encoding="utf-8")
        committed = (generate.REPO_ROOT / f"{stem}{suffix}").read_text(encoding="utf-8")
        assert fresh == committed, f"{stem}{suffix} is stale: run `python -m protos.generate`"


def test_every_rpc_message_and_field_has_a_comment(tmp_path: Path) -> None:
    file_proto = _protoc_descriptor(tmp_path, source_info=True)
    commented = {
        tuple(loc.path) for loc in file_proto.source_code_info.location if loc.leading_comments.strip()
    }
    # Descriptor paths: 4 = message_type, 2 = field, 6 = service, 2 = method, 5 = enum_type, 2 = value.
    missing = []
    for m_index, message in enumerate(file_proto.message_type):
        for f_index, field in enumerate(message.field):
            if (4, m_index, 2, f_index) not in commented:
                missing.append(f"{message.name}.{field.name}")
    for s_index, service in enumerate(file_proto.service):
        if (6, s_index) not in commented:
            missing.append(service.name)
        for r_index, method in enumerate(service.method):
            if (6, s_index, 2, r_index) not in commented:
                missing.append(f"{service.name}.{method.name}")
    for e_index, enum in enumerate(file_proto.enum_type):
        for v_index, value in enumerate(enum.value):
            if (5, e_index, 2, v_index) not in commented:
                missing.append(f"{enum.name}.{value.name}")
    assert not missing, f"undocumented in {PROTO}: {missing}"


def test_contract_is_language_neutral_and_versioned(tmp_path: Path) -> None:
    file_proto = _protoc_descriptor(tmp_path)
    assert file_proto.package == "charstream.v1"
    assert file_proto.syntax == "proto3"
    # No language-specific options (python/java/go packages ...) leak into the contract.
    assert file_proto.options.ListFields() == []
    (service,) = file_proto.service
    assert service.name == "Generator"
    # One request/response pair per RPC: no message type is shared between RPCs.
    used = [m.input_type for m in service.method] + [m.output_type for m in service.method]
    assert len(used) == len(set(used))
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
    assert streaming["Generate"] == (False, True)
    assert streaming["Converse"] == (True, True)
    assert {"GetModelInfo", "CreateSession", "GetSession", "ResetSession", "DeleteSession", "ListSessions"} <= set(
        streaming
    )
