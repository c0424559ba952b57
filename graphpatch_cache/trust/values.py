"""The loader's checks of data values in an artifact: pytree specs, call signatures, encoded
arguments (numbers, strings, dtypes, devices, containers of them, references to earlier
nodes; no callables, no dunder strings, bounded sizes and nesting), recorded shapes.

:class:`ValueChecker` is the base of the structural checker in :mod:`.validate`; it holds the
errors both raise, naming the file and the node path.
"""

from __future__ import annotations

import keyword
import re
from typing import Any, Set

import torch

from .. import _compat
from ..errors import ArtifactFormatError, DisallowedTargetError
from .allowlist import is_dunder
from .rules import IDENTIFIER

#: bounds that no real graph comes near; past them an artifact is refused quickly
MAX_VALUE_DEPTH = 32  # nesting of containers inside one argument
MAX_CONTAINER = 65_536  # elements of one container
MAX_STRING = 1 << 20  # characters of one string (pytree specs are the long ones)
MAX_INT = 1 << 63

_DUNDER_PART = re.compile(r"(^|\.)__\w+__($|\.)")
_DEVICE = re.compile(r"^(cpu|cuda|meta|mps|xpu|hpu|npu|xla|privateuseone)(:[0-9]{1,4})?$")
_TAGS = frozenset({"n", "f", "size", "t", "l", "d", "s", "e", "dtype", "device", "mf", "layout", "c", "fn"})

_SPECS_OK: Set[str] = set()  # specs already checked
_IDENTIFIERS: Set[str] = set()  # names already found to be identifiers (layers repeat them)


class ValueChecker:
    """Checks of one artifact's data values; errors name ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    # errors
    def malformed(self, where: str, why: str) -> ArtifactFormatError:
        at = f" at {where}" if where else ""
        return ArtifactFormatError(f"{self.path or 'artifact'}: {why}{at}", path=self.path,
                                   hint="the file is damaged or not written by graphpatch-cache; rebuild it")

    def devices(self, devices: Any) -> None:
        """``extraction.devices``: device names the loader parses (a malformed one would make
        ``torch.device`` raise an untyped error at bind)."""
        if not isinstance(devices, list) or not all(isinstance(d, str) and _DEVICE.fullmatch(d) for d in devices):
            raise self.malformed("extraction.devices", f"not a list of device names: {devices!r:.120}")

    def refuse(self, where: str, target: str, why: str) -> DisallowedTargetError:
        return DisallowedTargetError(
            f"refusing node {where or '<root>'!r} ({target!s:.80}): {why}", node_path=where, target=str(target)[:200],
            hint="this artifact asks for something graphs may not do; do not load artifacts you do not trust "
            "(rebuild it: graphpatch-cache verify --rebuild, or remove it: graphpatch-cache rm)")

    # pieces
    def spec(self, text: Any, where: str) -> None:
        if not isinstance(text, str):
            raise self.malformed(where, "a pytree spec is not a string")
        if text in _SPECS_OK:
            return
        try:
            _compat.check_spec(text, strict=False)
        except _compat.UnsafeSpecError as exc:
            raise self.refuse(where, "pytree spec", str(exc)) from None
        if len(_SPECS_OK) < 10_000:
            _SPECS_OK.add(text)

    def signature(self, sig: Any, where: str) -> None:
        if not isinstance(sig, dict) or not isinstance(sig.get("leaves"), list):
            raise self.malformed(where, "malformed signature")
        self.spec(sig.get("spec"), where)
        for leaf in sig["leaves"]:
            if not isinstance(leaf, dict):
                raise self.malformed(where, "malformed signature leaf")
            if leaf.get("kind") == "const":  # compared with the call's constants, never decoded
                self.inert(leaf.get("value"), where, 0)

    def inert(self, v: Any, where: str, depth: int) -> None:
        """Data that is only compared: bounded JSON."""
        if depth > MAX_VALUE_DEPTH:
            raise self.malformed(where, "a signature constant nested too deeply")
        if isinstance(v, (list, dict)):
            if len(v) > MAX_CONTAINER:
                raise self.malformed(where, "a signature constant too large")
            for item in (v.values() if isinstance(v, dict) else v):
                self.inert(item, where, depth + 1)
        elif isinstance(v, str) and len(v) > MAX_STRING:
            raise self.malformed(where, "a signature constant too long")

    @staticmethod
    def identifier(name: Any) -> bool:
        if name in _IDENTIFIERS:
            return True
        ok = isinstance(name, str) and bool(IDENTIFIER.fullmatch(name)) and not keyword.iskeyword(name) \
            and not is_dunder(name)
        if ok and len(_IDENTIFIERS) < 100_000:
            _IDENTIFIERS.add(name)
        return ok

    def meta_shape(self, meta: Any, where: str) -> None:
        """Binding compares a get_attr's recorded shape and dtype with the live tensor's."""
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if shape is not None and not (isinstance(shape, list) and len(shape) <= 64 and all(
                type(d) is int or isinstance(d, str) for d in shape)):
            raise self.malformed(where, "a malformed recorded shape")
        if isinstance(meta, dict) and "dtype" in meta and not isinstance(meta["dtype"], str):
            raise self.malformed(where, "a malformed recorded dtype")

    def value(self, v: Any, where: str, target: Any, depth: int, refs: Set[str]) -> None:
        if depth > MAX_VALUE_DEPTH:
            raise self.malformed(where, "an argument nested too deeply")
        if v is None or v is True or v is False:
            return
        if type(v) is dict and len(v) == 1 and "n" in v and type(v["n"]) is str:  # the common case: a reference
            refs.add(v["n"])
            return
        if isinstance(v, int):
            if not -MAX_INT <= v < MAX_INT:
                raise self.malformed(where, "an integer argument out of range")
            return
        if isinstance(v, str):
            if len(v) > MAX_STRING:
                raise self.malformed(where, "a string argument too long")
            if is_dunder(v) or (len(v) < 4096 and _DUNDER_PART.search(v)):
                raise self.refuse(where, target, f"a dunder name {v[:60]!r} as an argument")
            return
        if isinstance(v, list):
            if len(v) > MAX_CONTAINER:
                raise self.malformed(where, "an argument container too large")
            for item in v:
                self.value(item, where, target, depth + 1, refs)
            return
        if not isinstance(v, dict) or len(v) != 1:
            raise self.malformed(where, "an argument that is not an encoded value")
        (tag, x), = v.items()
        if tag not in _TAGS:
            raise self.malformed(where, f"unknown value tag {tag!r}")
        self.tagged(tag, x, where, target, depth, refs)

    def tagged(self, tag: str, x: Any, where: str, target: Any, depth: int, refs: Set[str]) -> None:
        """One encoded value ``{tag: x}`` (see :mod:`graphpatch_cache.artifact.codec`)."""
        if tag == "n":
            if not isinstance(x, str):
                raise self.malformed(where, "a malformed node reference")
            refs.add(x)
        elif tag == "fn":
            raise self.refuse(where, target, f"a callable argument ({x!s:.80}): graphs pass data, not functions")
        elif tag == "f":
            if not isinstance(x, str) or len(x) > 64:
                raise self.malformed(where, "a malformed float")
            float.fromhex(x)  # ValueError -> ArtifactFormatError
        elif tag == "c":
            if not (isinstance(x, list) and len(x) == 2 and all(isinstance(i, str) and len(i) <= 64 for i in x)):
                raise self.malformed(where, "a malformed complex number")
            float.fromhex(x[0]), float.fromhex(x[1])
        elif tag == "device":
            if not isinstance(x, str) or not _DEVICE.fullmatch(x):
                raise self.malformed(where, f"an unknown device {x!s:.40}")
        elif tag in ("dtype", "mf", "layout"):
            if not isinstance(x, str) or x not in _NAMED[tag]:
                raise self.malformed(where, f"an unknown {tag} {x!s:.40}")
        elif tag == "e":
            if x != 1:
                raise self.malformed(where, "a malformed Ellipsis")
        elif tag == "s":
            if not isinstance(x, list) or len(x) != 3:
                raise self.malformed(where, "a malformed slice")
            self.value(x, where, target, depth + 1, refs)
        elif tag == "d":
            if not isinstance(x, list) or len(x) > MAX_CONTAINER:
                raise self.malformed(where, "a malformed dict")
            for pair in x:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise self.malformed(where, "a malformed dict entry")
                if isinstance(pair[0], (list, dict)) and not _hashable(pair[0]):
                    raise self.malformed(where, "an unhashable dict key")
                self.value(pair[0], where, target, depth + 1, refs)
                self.value(pair[1], where, target, depth + 1, refs)
        else:  # t, l, size
            if not isinstance(x, list):
                raise self.malformed(where, f"a malformed {tag}")
            self.value(x, where, target, depth + 1, refs)


def _hashable(v: Any) -> bool:
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        return tag in ("t", "size", "f", "e", "dtype", "device", "n") and (tag != "t" or all(
            not isinstance(i, (list, dict)) or _hashable(i) for i in x))
    return not isinstance(v, (list, dict))


_NAMED = {
    "dtype": frozenset(str(d).removeprefix("torch.") for d in vars(torch).values() if isinstance(d, torch.dtype)),
    "mf": frozenset({"contiguous_format", "channels_last", "channels_last_3d", "preserve_format"}),
    "layout": frozenset({"strided", "sparse_coo"}),
}


__all__ = ["MAX_CONTAINER", "MAX_INT", "MAX_STRING", "MAX_VALUE_DEPTH", "ValueChecker"]
