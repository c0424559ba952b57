"""Call signatures: what about a call's inputs a graph was extracted for.

Dynamo drops its guards with the graph, so we keep our own. A signature records the
structure of the canonical ``(args, kwargs)`` (which keyword arguments were given, which were
None), and per leaf either the tensor's dtype, rank (and, for information only, device type:
graphs are device-independent) and which dimensions are
fixed, or the exact value of a Python constant. A dimension traced symbolically serves any
size of 1 or more (``"dyn1"``) where extraction found that the model's code does not branch on
it being 1 (see ``extraction/sizes.py``), else any size of 2 or more (``"dyn"``: the model
branches on size 1 there, or the graph was traced with dynamo's default 0/1 specialization).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Dict, List, Sequence

import torch

from .. import _compat
from .codec import encode_value
from .names import qualname


def constant_value(value: Any) -> Any:
    """How a signature (and a key) records a non-tensor input: its encoded value, or its
    type's name where it has no data form."""
    try:
        return encode_value(value, lambda v: None, lambda f: f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', '?')}")
    except Exception:
        return {"repr": qualname(type(value))}


def signature_key(signature: Dict[str, Any]) -> str:
    """A short stable digest of a signature (for dictionaries and cache keys)."""
    text = json.dumps(signature, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: a signature dimension traced symbolically: any size >= 2, any size >= 1
SYMBOLIC = ("dyn", "dyn1")


def dims_rule(want: Sequence[Any]) -> Callable[[Sequence[int]], bool]:
    """The fit rule of a tensor's dimensions, the one place it is written (for stored
    signatures and for live calls), as a check of a shape (a tuple or ``torch.Size``): the
    same rank; a fixed dimension takes exactly its size, a symbolic one any size of 2 or more
    (``"dyn"``) or of 1 or more (``"dyn1"``); never 0. Built once per signature leaf, so a
    call pays one comparison per dimension."""
    fixed = tuple(want)
    dyn = tuple((i, 2 if w == "dyn" else 1) for i, w in enumerate(fixed) if w in SYMBOLIC)
    if not dyn:
        return fixed.__eq__  # (torch.Size is a tuple: one C comparison)
    rank = len(fixed)
    sized = tuple((i, w) for i, w in enumerate(fixed) if w not in SYMBOLIC)

    def fits(sizes: Sequence[int]) -> bool:
        if len(sizes) != rank:
            return False
        for i, least in dyn:
            if sizes[i] < least:
                return False
        for i, w in sized:
            if sizes[i] != w:
                return False
        return True

    return fits


def _leaf_fits(want: Dict[str, Any], got: Dict[str, Any]) -> bool:
    """A concrete signature leaf against a stored one (:meth:`SignatureMatcher.fits` is the
    same rule on live values)."""
    if want["kind"] != got["kind"]:
        return False
    if want["kind"] == "const":
        return bool(want["value"] == got["value"])
    return bool(want["dtype"] == got["dtype"]) and dims_rule(want["dims"])(tuple(got["dims"])) is True


def matches(signature: Dict[str, Any], concrete: Dict[str, Any]) -> bool:
    """Whether a call with concrete signature ``concrete`` (every dimension a number) fits
    ``signature``."""
    if signature["spec"] != concrete["spec"] or len(signature["leaves"]) != len(concrete["leaves"]):
        return False
    return all(_leaf_fits(w, g) for w, g in zip(signature["leaves"], concrete["leaves"]))


def describe_mismatch(signature: Dict[str, Any], candidate: Dict[str, Any], names: List[str]) -> str:
    """A sentence naming the first input that differs, and how (old vs new)."""
    if signature["spec"] != candidate["spec"]:
        called = ", ".join(n for n in names if n) or "no arguments"
        return f"the set of arguments (or their nesting) differs from the extraction call (called with: {called})"
    for i, (want, got) in enumerate(zip(signature["leaves"], candidate["leaves"])):
        name = names[i] if i < len(names) else f"input #{i}"
        if not _leaf_fits(want, got):
            return f"input {name!r}: {_how_leaves_differ(want, got)}"
    return "inputs differ"


def _how_leaves_differ(want: Dict[str, Any], got: Dict[str, Any]) -> str:
    if want["kind"] != got["kind"]:
        return (f"extracted for a {'tensor' if want['kind'] == 'tensor' else 'constant'}, "
                f"called with {'a tensor' if got['kind'] == 'tensor' else repr(got.get('value'))}")
    if want["kind"] == "const":
        return f"extracted for the value {want['value']!r}, called with {got['value']!r}"
    if want["dtype"] != got["dtype"]:
        return f"extracted for dtype {want['dtype']}, called with {got['dtype']}{_dtype_hint(want['dtype'], got['dtype'])}"
    wanted, sizes = list(want["dims"]), list(got["dims"])
    if len(wanted) != len(sizes):
        return f"extracted for {len(wanted)} dimensions, called with shape {tuple(sizes)}"
    for d, (w, g) in enumerate(zip(wanted, sizes)):
        if w == "dyn" and g < 2:
            return (f"size {g} in dimension {d}: the graphs serve any size of 2 or more there (the model's code "
                    f"branches on a size of {g} there, or they were traced treating sizes 0 and 1 as special "
                    f"cases) (shape {tuple(sizes)})")
        if w == "dyn1" and g < 1:
            return f"size 0 in dimension {d}: the graphs serve any size of 1 or more there (shape {tuple(sizes)})"
        if w not in SYMBOLIC and w != g:
            return f"dimension {d} is fixed at {w} in the extracted graphs, called with {g} (shape {tuple(sizes)})"
    return f"extracted for {want}, called with {got}"


def _dtype_hint(want: str, got: str) -> str:
    """How to reach the graphs of an integer input of another width (token ids): casting."""
    if {want, got} == {"int64", "int32"}:
        cast = ".long()" if want == "int64" else ".int()"
        return (f" (tokenizers return int64 ids; cast with `{cast}` to use the graphs extracted so far: a graph "
                "serves the one dtype it was traced with, since an input's dtype can change what the model "
                "computes from it)")
    return ""


#: dtype names as signatures write them (``str(dtype)`` without ``torch.``) -> dtype
_DTYPES = {str(v)[6:]: v for v in vars(torch).values() if isinstance(v, torch.dtype)}


class SignatureMatcher:
    """Fast per-call check of flat inputs against one extracted signature."""

    def __init__(self, signature: Dict[str, Any]) -> None:
        self.signature = signature
        self.spec = _compat.treespec_loads(signature["spec"])
        self.leaves = signature["leaves"]
        #: per leaf, the torch.dtype a tensor must have (None for constants): compared by
        #: identity per call instead of formatting the leaf's dtype
        self._dtypes = [_DTYPES.get(w["dtype"]) if w["kind"] == "tensor" else None for w in self.leaves]
        #: per leaf, :func:`dims_rule` of a tensor's dimensions (None for constants)
        self._dims = [dims_rule(w["dims"]) if w["kind"] == "tensor" else None for w in self.leaves]

    def fits(self, leaves: List[Any], spec: Any) -> bool:
        """Whether flat call inputs fit: :func:`_leaf_fits`'s rule, on live values (tensors'
        dtypes compared by identity)."""
        if spec != self.spec or len(leaves) != len(self.leaves):
            return False
        for want, dtype, dims_fit, leaf in zip(self.leaves, self._dtypes, self._dims, leaves):
            if dims_fit is not None:  # a tensor
                if not (isinstance(leaf, torch.Tensor) and leaf.dtype is dtype and dims_fit(leaf.shape) is True):
                    return False
            elif isinstance(leaf, torch.Tensor) or constant_value(leaf) != want["value"]:
                return False
        return True


__all__ = ["SYMBOLIC", "SignatureMatcher", "constant_value", "describe_mismatch", "dims_rule", "matches", "signature_key"]
