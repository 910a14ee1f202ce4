"""Generate docs/reference.md: the gRPC and MQTT contracts, from their sources.

Run from anywhere: ``python scripts/gen_reference.py`` (rewrites ``docs/reference.md``)
or ``python scripts/gen_reference.py --check`` (exit 1 if the file is stale).

Sources, and nothing else:

* every ``.proto`` file under ``protos/``: services, RPCs, messages, fields and enums
  with the comments written above (or after) them. The comments are read by protoc
  itself (``--include_source_info``), so what protoc calls a comment is what lands here;
* ``protos/topics.py``: the topic layout in its module docstring, the name rule, and
  the device ACL lines of :func:`protos.topics.acl_device_pattern_lines`;
* ``devices/secure_fleet.py``: the cloud user's ACL lines
  (:func:`devices.secure_fleet.cloud_acl_lines`).

``tests/test_docs.py`` fails when the committed file differs from what this produces,
so: edit the ``.proto`` (or topics.py), run this script, commit both.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.protobuf.descriptor_pb2 import (
        DescriptorProto,
        EnumDescriptorProto,
        FieldDescriptorProto,
        FileDescriptorProto,
        FileDescriptorSet,
    )

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "reference.md"

# Field numbers of descriptor.proto used in SourceCodeInfo location paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE, _FILE_SYNTAX = 4, 5, 6, 12
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

# Placeholder fleet name substituted into generated topic strings, then shown as {fleet}.
_FLEET_PLACEHOLDER = "FLEETNAME"


@dataclass(frozen=True)
class _Comments:
    """protoc's comments for every element of one file, by location path."""

    by_path: dict[tuple[int, ...], str]

    def get(self, *path: int) -> str:
        return self.by_path.get(tuple(path), "")


def _clean(text: str) -> str:
    """A protoc comment as Markdown text: strip each line, keep paragraph breaks."""
    lines = [line.strip() for line in text.strip("\n").splitlines()]
    out: list[str] = []
    for line in lines:
        if not line:
            if out and out[-1] != "":
                out.append("")
        else:
            out.append(line)
    return "\n".join(out).strip()


def _one_line(text: str) -> str:
    """Comment text fit for a table cell (one line, pipes escaped)."""
    return " ".join(text.split()).replace("|", "\\|")


def _descriptor_set() -> FileDescriptorSet:
    """Compile every .proto under protos/ into a FileDescriptorSet with source info."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc  # dev dependency, like scripts/gen_protos.py

    include = Path(protoc.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"-I{include}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *files,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
    return fds


def _comments(file_proto: FileDescriptorProto) -> _Comments:
    by_path: dict[tuple[int, ...], str] = {}
    for loc in file_proto.source_code_info.location:
        parts = [loc.leading_comments, loc.trailing_comments]
        text = "\n\n".join(_clean(p) for p in parts if p.strip())
        if text:
            by_path[tuple(loc.path)] = text
    return _Comments(by_path)


_SCALAR_NAMES = {
    1: "double",
    2: "float",
    3: "int64",
    4: "uint64",
    5: "int32",
    6: "fixed64",
    7: "fixed32",
    8: "bool",
    9: "string",
    12: "bytes",
    13: "uint32",
    15: "sfixed32",
    16: "sfixed64",
    17: "sint32",
    18: "sint64",
}
_TYPE_MESSAGE, _TYPE_ENUM = 11, 14
_LABEL_REPEATED = 3


def _type_name(field: FieldDescriptorProto, maps: dict[str, DescriptorProto]) -> str:
    """The field's type as written in the .proto (``map<K, V>``, ``repeated T``, ``T``)."""
    if field.type in (_TYPE_MESSAGE, _TYPE_ENUM):
        full = field.type_name.lstrip(".")
        entry = maps.get(full)
        if entry is not None:
            key, value = entry.field
            return f"map<{_type_name(key, maps)}, {_type_name(value, maps)}>"
        base = full
    else:
        base = _SCALAR_NAMES.get(field.type, "?")
    if field.label == _LABEL_REPEATED:
        return f"repeated {base}"
    return base


def _collect_maps(
    package: str, messages: list[DescriptorProto], prefix: str = ""
) -> dict[str, DescriptorProto]:
    """Synthetic ``*Entry`` messages of map fields, by full name."""
    out: dict[str, DescriptorProto] = {}
    for msg in messages:
        full = f"{prefix or package}.{msg.name}"
        if msg.options.map_entry:
            out[full] = msg
        out.update(_collect_maps(package, list(msg.nested_type), full))
    return out


def _render_enum(
    lines: list[str],
    enum: EnumDescriptorProto,
    name: str,
    comments: _Comments,
    path: tuple[int, ...],
) -> None:
    lines.append(f"#### enum `{name}`")
    lines.append("")
    doc = comments.get(*path)
    if doc:
        lines += [doc, ""]
    lines += ["| value | number | description |", "|---|---|---|"]
    for i, value in enumerate(enum.value):
        text = _one_line(comments.get(*path, _ENUM_VALUE, i))
        lines.append(f"| `{value.name}` | {value.number} | {text} |")
    lines.append("")


def _render_message(
    lines: list[str],
    msg: DescriptorProto,
    name: str,
    comments: _Comments,
    path: tuple[int, ...],
    maps: dict[str, DescriptorProto],
) -> None:
    if msg.options.map_entry:
        return
    lines.append(f"#### message `{name}`")
    lines.append("")
    doc = comments.get(*path)
    if doc:
        lines += [doc, ""]
    fields = list(msg.field)
    if fields:
        lines += ["| field | number | type | description |", "|---|---|---|---|"]
        oneofs = [o.name for o in msg.oneof_decl]
        for i, field in enumerate(fields):
            text = _one_line(comments.get(*path, _MSG_FIELD, i))
            if field.HasField("oneof_index"):
                note = f"(oneof `{oneofs[field.oneof_index]}`)"
                text = f"{note} {text}".strip()
            lines.append(
                f"| `{field.name}` | {field.number} | `{_type_name(field, maps)}` | {text} |"
            )
        lines.append("")
    else:
        lines += ["(no fields)", ""]
    for i, nested in enumerate(msg.nested_type):
        _render_message(
            lines, nested, f"{name}.{nested.name}", comments, (*path, _MSG_NESTED, i), maps
        )
    for i, enum in enumerate(msg.enum_type):
        _render_enum(lines, enum, f"{name}.{enum.name}", comments, (*path, _MSG_ENUM, i))


def _short(type_name: str, package: str) -> str:
    name = type_name.lstrip(".")
    return name[len(package) + 1 :] if name.startswith(package + ".") else name


def _render_file(lines: list[str], fp: FileDescriptorProto) -> None:
    comments = _comments(fp)
    package = fp.package
    lines.append(f"### `{fp.name}` (package `{package}`)")
    lines.append("")
    header = comments.get(_FILE_SYNTAX)
    if header:
        lines += [header, ""]
    maps = _collect_maps(package, list(fp.message_type))
    for si, service in enumerate(fp.service):
        lines.append(f"#### service `{package}.{service.name}`")
        lines.append("")
        doc = comments.get(_FILE_SERVICE, si)
        if doc:
            lines += [doc, ""]
        lines += ["| RPC | request | response | description |", "|---|---|---|---|"]
        for mi, method in enumerate(service.method):
            text = _one_line(comments.get(_FILE_SERVICE, si, _SERVICE_METHOD, mi))
            stream_in = "stream " if method.client_streaming else ""
            stream_out = "stream " if method.server_streaming else ""
            lines.append(
                f"| `{method.name}` | `{stream_in}{_short(method.input_type, package)}` "
                f"| `{stream_out}{_short(method.output_type, package)}` | {text} |"
            )
        lines.append("")
    for i, enum in enumerate(fp.enum_type):
        _render_enum(lines, enum, enum.name, comments, (_FILE_ENUM, i))
    for i, msg in enumerate(fp.message_type):
        _render_message(lines, msg, msg.name, comments, (_FILE_MESSAGE, i), maps)


def _topics_section() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from devices.secure_fleet import CLOUD_USER, cloud_acl_lines
    from protos import topics

    def generic(line: str) -> str:
        return line.replace(f"/{_FLEET_PLACEHOLDER}/", "/{fleet}/")

    doc = (inspect.getdoc(topics) or "").replace("``", "`")
    intro, _, rest = doc.partition("::")
    layout, _, after = rest.strip("\n").partition("\n\n")
    intro_text = " ".join(_clean(intro).split())
    lines = [
        "## MQTT topics",
        "",
        "From `protos/topics.py`, the one module that builds topic strings. " + intro_text + ":",
        "",
        "```text",
        *(line.strip() for line in layout.splitlines() if line.strip()),
        "```",
        "",
        " ".join(_clean(after).split()),
        "",
        "Payloads are the protobuf messages above: `edgefl.v1.ReleaseManifest` on the "
        "manifest topic, raw bytes of a serialized `edgefl.v1.ModelPackage` split into "
        "chunks on the chunk topics, `edgefl.v1.DeviceStatus` and `edgefl.v1.DeviceEvent` "
        "on a device's topics.",
        "",
        "### Access control (secure fleets)",
        "",
        "Mosquitto ACL pattern lines for devices (`%u` is the MQTT user name, which is "
        "the device id), from `protos.topics.acl_device_pattern_lines`:",
        "",
        "```text",
        *(generic(line) for line in topics.acl_device_pattern_lines(_FLEET_PLACEHOLDER)),
        "```",
        "",
        "Enrolling a device (`edgefl devices flash`) regenerates the ACL file with these "
        "lines as `topic` lines, the device's name in place of `%u`. The cloud's own user "
        f"(`{CLOUD_USER}`), from `devices.secure_fleet.cloud_acl_lines`:",
        "",
        "```text",
        *(generic(line) for line in cloud_acl_lines(_FLEET_PLACEHOLDER)),
        "```",
        "",
        "No `topic` line precedes the first `user` line, so anonymous clients get nothing.",
        "",
    ]
    return lines


def _signed_form_section() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from protos.codec import SIGNED_FORM_DOC

    return [
        "## Signed release manifests",
        "",
        "From `protos.codec.SIGNED_FORM_DOC`, next to the one function that builds these "
        "bytes (`protos.codec.manifest_signing_bytes`).",
        "",
        *SIGNED_FORM_DOC.splitlines(),
        "",
        "A test vector lives in [`docs/vectors/`](vectors/README.md): a manifest's values "
        "(`release-manifest.json`), its signed bytes (`release-manifest.signed`), the "
        "public key (`release-manifest.pub.pem`) and the signature "
        "(`release-manifest.sig`). OpenSSL 3 verifies it without any edgefl code:",
        "",
        "```sh",
        "cd docs/vectors",
        "openssl pkeyutl -verify -pubin -inkey release-manifest.pub.pem -rawin \\",
        "  -in release-manifest.signed -sigfile release-manifest.sig",
        "```",
        "",
        "`tests/protos/test_signed_form.py` rebuilds the signed bytes from the JSON values "
        "by following the steps above, checks them against the file and runs that command.",
        "",
    ]


def _rollout_section() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from protos import cohort

    doc = (inspect.getdoc(cohort) or "").replace("``", "`")
    _title, _, body = doc.partition("\n\n")
    return [
        "## Staged rollouts",
        "",
        "From `protos/cohort.py` (the cloud side is `cloud/rollout.py`; the policy is "
        "`[rollout]` in cloud.toml, see the operator guide).",
        "",
        *body.splitlines(),
        "",
    ]


def render() -> str:
    """The whole of docs/reference.md."""
    fds = _descriptor_set()
    files = sorted(fds.file, key=lambda f: (not f.name.startswith("protos/edgefl"), f.name))
    lines = [
        "# Reference: gRPC and MQTT contracts",
        "",
        "<!-- Generated by scripts/gen_reference.py from protos/**/*.proto, protos/topics.py, "
        "protos/codec.py and devices/secure_fleet.py. Do not edit: edit the sources and "
        "rerun the script. -->",
        "",
        "Everything that crosses a process boundary in edgefl. A device serves the gRPC "
        "services below on one port (`[grpc] port` in `edge.toml`), together with "
        "`grpc.health.v1.Health` and server reflection; releases, status and events travel "
        "over MQTT. Tensor bytes are little-endian and row-major everywhere.",
        "",
        "## gRPC services and messages",
        "",
    ]
    for fp in files:
        if not fp.name.startswith("protos/"):
            continue  # imported well-known types
        _render_file(lines, fp)
    lines += _signed_form_section()
    lines += _rollout_section()
    lines += _topics_section()
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is stale")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="output file")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python scripts/gen_reference.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
