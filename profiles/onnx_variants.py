"""The ``[onnx]`` section of a profile: which ONNX variants to make (``edgequant.quantize.onnx_export``).

::

    [onnx]
    variants = ["fp32", "int8", "int4", "int4-b128"]   # rungs, in this order

    [onnx.int8]                  # options of a variant named after its kind
    per_channel = false

    [onnx.int4-b128]             # a variant of any name: its kind and options
    kind = "int4"
    block_size = 128

A name is either a kind (``fp32``, ``fp16``, ``int8``, ``int4``) or has a
table of its own with ``kind``.  Options per kind (defaults in brackets):

* every kind: ``external_data`` [false]: store the weights in
  ``model.onnx_data`` even under 2 GB (over 2 GB it is always used);
* ``int8`` (onnxruntime ``quantize_dynamic``, QInt8): ``per_channel`` [false],
  ``quantize_embedding`` [false] (the token-embedding ``Gather`` too);
* ``int4`` (``MatMulNBits``, weight only): ``block_size`` 32, 64 or 128 [32],
  ``symmetric`` [true], ``accuracy_level`` 0-4 [4; 0 = onnxruntime's
  default], ``quantize_embedding`` [false] (``GatherBlockQuantized``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

KINDS = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = (32, 64, 128)
_OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {"external_data": False},
    "fp16": {"external_data": False},
    "int8": {"external_data": False, "per_channel": False, "quantize_embedding": False},
    "int4": {"external_data": False, "block_size": 32, "symmetric": True, "accuracy_level": 4,
             "quantize_embedding": False},
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


@dataclass(frozen=True)
class OnnxVariant:
    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def option(self, key: str) -> Any:
        return self.options.get(key, _OPTIONS[self.kind][key])

    @property
    def external_data(self) -> bool:
        return bool(self.option("external_data"))

    def key_options(self) -> dict[str, Any]:
        """Every option that changes the bytes; empty for a plain fp32 export."""
        opts = {k: self.option(k) for k in _OPTIONS[self.kind]}
        if self.kind in ("fp32", "fp16") and not opts["external_data"]:
            opts.pop("external_data")
        return opts


@dataclass(frozen=True)
class OnnxSpec:
    variants: tuple[OnnxVariant, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.variants)


def parse_onnx(checker, data: Any) -> OnnxSpec:
    """Validate the ``[onnx]`` table with the profile's checker (errors name the file and field)."""
    if data is None:
        return OnnxSpec()
    if not isinstance(data, dict):
        raise checker.fail("onnx", "must be a table")
    names = data.get("variants", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise checker.fail("onnx.variants", "must be a list of variant names")
    tables = {k: v for k, v in data.items() if k != "variants"}
    for key, table in tables.items():
        if not isinstance(table, dict):
            raise checker.fail(f"onnx.{key}", f"is not a known field; allowed: variants, or a table named after "
                                              f"a variant ({', '.join(KINDS)} or a name with kind = ...)")
        if key not in names:
            raise checker.fail(f"onnx.{key}", f"configures variant {key!r}, which onnx.variants does not list")
    out: list[OnnxVariant] = []
    for i, raw in enumerate(names):
        name = raw.lower()
        where = f"onnx.variants[{i}]"
        if not _NAME.match(name):
            raise checker.fail(where, f"{raw!r} is not a usable variant name (letters, digits, - and _)")
        if any(v.name == name for v in out):
            raise checker.fail(where, f"repeats {name}")
        table = dict(tables.get(raw, tables.get(name, {})))
        kind = table.pop("kind", name if name in KINDS else None)
        if kind is None:
            raise checker.fail(where, f"unknown ONNX variant {raw!r}; known: {', '.join(KINDS)}, or add a "
                                      f"[onnx.{raw}] table with kind = one of those")
        if kind not in KINDS:
            raise checker.fail(f"onnx.{raw}.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
        allowed = _OPTIONS[kind]
        checker.table(table, f"onnx.{raw}", set(allowed))
        options = {}
        for key, value in table.items():
            default = allowed[key]
            bounds = {"accuracy_level": (0, 4)}.get(key, (None, None))
            options[key] = checker.typed(value, f"onnx.{raw}.{key}", type(default), *bounds)
        if "block_size" in options and options["block_size"] not in BLOCK_SIZES:
            raise checker.fail(f"onnx.{raw}.block_size", f"must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                                                         f"got {options['block_size']}")
        out.append(OnnxVariant(name=name, kind=kind, options=options))
    return OnnxSpec(tuple(out))
