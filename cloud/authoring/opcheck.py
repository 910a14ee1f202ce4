"""List the operators of a ``.tflite`` flatbuffer and flag Flex or custom ops.

A device runs models with the plain LiteRT runtime, which has no TensorFlow (Flex)
kernels and no custom-op registrations; a model using any of them fails at
``allocate_tensors`` on the device. This module reads the flatbuffer with the schema
module shipped in ``ai_edge_litert`` (pure Python on top of ``flatbuffers``), so it
runs anywhere the device runtime is installed and never needs TensorFlow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ai_edge_litert import schema_py_generated as schema

from cloud.errors import CloudError

logger = logging.getLogger(__name__)

_BUILTIN_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(schema.BuiltinOperator).items()
    if not name.startswith("_") and isinstance(value, int)
}

TFLITE_IDENTIFIER = b"TFL3"


class OpCheckError(CloudError, ValueError):
    """The bytes are not a readable TFLite flatbuffer."""


@dataclass(frozen=True)
class OpCheckReport:
    """Operators used by a model and what would not run on a plain LiteRT runtime."""

    builtin_ops: tuple[str, ...]
    """Sorted, de-duplicated builtin operator names (e.g. ``FULLY_CONNECTED``)."""
    flex_ops: tuple[str, ...] = ()
    """Custom codes starting with ``Flex`` (TensorFlow ops via the Select-TF-ops delegate)."""
    custom_ops: tuple[str, ...] = ()
    """Other custom codes (need a registration the runtime does not have)."""
    signatures: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """Signature key → ``{"inputs": [...], "outputs": [...]}`` (signature tensor names)."""

    @property
    def ok(self) -> bool:
        """True when the model uses builtin operators only."""
        return not self.flex_ops and not self.custom_ops

    def summary(self) -> str:
        """One line for logs and the CLI."""
        if self.ok:
            return f"ok: {len(self.builtin_ops)} builtin op types, no Flex/custom ops"
        parts = []
        if self.flex_ops:
            parts.append(f"Flex ops: {', '.join(self.flex_ops)}")
        if self.custom_ops:
            parts.append(f"custom ops: {', '.join(self.custom_ops)}")
        return "NOT PORTABLE: " + "; ".join(parts)


def _decode(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def check_bytes(data: bytes) -> OpCheckReport:
    """Parse a ``.tflite`` flatbuffer and report its operator codes and signatures."""
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise OpCheckError("not a TFLite flatbuffer (missing 'TFL3' file identifier)")
    try:
        model = schema.Model.GetRootAs(data, 0)
        builtin: set[str] = set()
        flex: set[str] = set()
        custom: set[str] = set()
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            # Newer files store the code in BuiltinCode; old ones in the int8 deprecated
            # field (values < 127). The larger of the two is the real one.
            op = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
            if op == schema.BuiltinOperator.CUSTOM:
                name = _decode(code.CustomCode())
                (flex if name.startswith("Flex") else custom).add(name or "<unnamed>")
            else:
                builtin.add(_BUILTIN_NAMES.get(op, f"BUILTIN_{op}"))
        signatures: dict[str, dict[str, list[str]]] = {}
        for i in range(model.SignatureDefsLength()):
            sig = model.SignatureDefs(i)
            signatures[_decode(sig.SignatureKey())] = {
                "inputs": [_decode(sig.Inputs(j).Name()) for j in range(sig.InputsLength())],
                "outputs": [_decode(sig.Outputs(j).Name()) for j in range(sig.OutputsLength())],
            }
    except (IndexError, ValueError, TypeError) as exc:  # truncated or corrupt buffer
        raise OpCheckError(f"cannot parse TFLite flatbuffer: {exc}") from exc
    report = OpCheckReport(
        builtin_ops=tuple(sorted(builtin)),
        flex_ops=tuple(sorted(flex)),
        custom_ops=tuple(sorted(custom)),
        signatures=signatures,
    )
    logger.debug("op check: %s", report.summary())
    return report


def check_file(path: str | Path) -> OpCheckReport:
    """Read ``path`` and run :func:`check_bytes` on it."""
    return check_bytes(Path(path).read_bytes())
