"""The value codec: node arguments (constants, dtypes, devices, slices, node references) to
JSON-compatible data and back. Node references are ``{"n": name}``, resolved by the caller
through ``lookup``; callables are written as names, never as objects."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional
import torch
from ..errors import SerializationError


_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


_MEMORY_FORMATS = {
    str(m).removeprefix("torch."): m
    for m in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)
}


_LAYOUTS = {str(v).removeprefix("torch."): v for v in (torch.strided, torch.sparse_coo)}


def encode_value(value: Any, node_name: Callable[[Any], Optional[str]], encode_callable: Callable[[Any], str]) -> Any:
    """Encode a node argument as JSON data.

    :param node_name: returns the node name for a graph node, ``None`` for anything else.
    :param encode_callable: returns the qualified name of a callable argument.
    :raises SerializationError: for values that have no data form.
    """

    def enc(v: Any) -> Any:
        name = node_name(v)
        if name is not None:
            return {"n": name}
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v
        if isinstance(v, float):
            return {"f": v.hex()} if not math.isfinite(v) or v != v else {"f": v.hex()}
        if isinstance(v, torch.Size):
            return {"size": [enc(x) for x in v]}
        if isinstance(v, tuple):
            return {"t": [enc(x) for x in v]}
        if isinstance(v, list):
            return {"l": [enc(x) for x in v]}
        if isinstance(v, dict):
            return {"d": [[enc(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, slice):
            return {"s": [enc(v.start), enc(v.stop), enc(v.step)]}
        if v is Ellipsis:
            return {"e": 1}
        if isinstance(v, torch.dtype):
            return {"dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if isinstance(v, torch.memory_format):
            return {"mf": str(v).removeprefix("torch.")}
        if isinstance(v, torch.layout):
            return {"layout": str(v).removeprefix("torch.")}
        if isinstance(v, complex):
            return {"c": [v.real.hex(), v.imag.hex()]}
        if callable(v):
            return {"fn": encode_callable(v)}
        raise SerializationError(f"cannot store a value of type {type(v).__name__}: {v!r:.80}")

    return enc(value)


def decode_value(
    data: Any,
    lookup: Callable[[str], Any],
    resolve_callable: Callable[[str], Any],
    map_device: Callable[[torch.device], torch.device] = lambda d: d,
) -> Any:
    """Inverse of :func:`encode_value`. ``lookup`` maps node names to nodes."""

    def dec(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, dict) and len(v) == 1:
            (tag, x), = v.items()
            if tag == "n":
                return lookup(x)
            if tag == "f":
                return float.fromhex(x)
            if tag == "size":
                return torch.Size([dec(i) for i in x])
            if tag == "t":
                return tuple(dec(i) for i in x)
            if tag == "l":
                return [dec(i) for i in x]
            if tag == "d":
                return {dec(k): dec(i) for k, i in x}
            if tag == "s":
                return slice(*(dec(i) for i in x))
            if tag == "e":
                return Ellipsis
            if tag == "dtype" and x in _DTYPES:
                return _DTYPES[x]
            if tag == "device":
                return map_device(torch.device(x))
            if tag == "mf" and x in _MEMORY_FORMATS:
                return _MEMORY_FORMATS[x]
            if tag == "layout" and x in _LAYOUTS:
                return _LAYOUTS[x]
            if tag == "c":
                return complex(float.fromhex(x[0]), float.fromhex(x[1]))
            if tag == "fn":
                return resolve_callable(x)
        raise SerializationError(f"malformed value in artifact: {v!r:.120}")

    return dec(data)


__all__ = ["decode_value", "encode_value"]
