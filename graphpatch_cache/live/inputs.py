"""A live call's inputs as graphs see them: canonical ``(args, kwargs)`` bound to
``forward``'s signature, their flat leaves, and the signature of a concrete call.

:class:`CallInputs` holds all of these for one call, computed once: the cache key, the
store lookup and extraction all receive it rather than re-deriving them layer by layer."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import _compat
from ..integrations import kv_cache
from ..artifact.signature import SignatureMatcher, constant_value, describe_mismatch


#: canonical inputs: positional arguments and keyword arguments, as ``forward`` binds them
Inputs = Tuple[Tuple[Any, ...], Dict[str, Any]]


#: per tensor leaf, per dimension: traced symbolically (True: sizes >= 2; "dyn1": sizes >= 1) or
#: fixed (False); None: every dimension symbolic, sizes >= 2
DynamicDims = Optional[Sequence[Optional[Sequence[Union[bool, str]]]]]


def canonical_inputs(module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                     signature: Optional[inspect.Signature] = None) -> Inputs:
    """Bind a call to ``module.forward``'s signature: positional arguments that have names
    become keywords (in signature order), so ``m(x)`` and ``m(input=x)`` look the same.
    ``signature``: ``inspect.signature(module.forward)``, when the caller keeps it (it costs
    more than the binding)."""
    try:
        sig = signature if signature is not None else inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{type(module).__name__}.forward() does not accept these inputs: {exc}") from exc
    # With extra positional arguments (*args), the named parameters before them must stay
    # positional too; otherwise they become keywords.
    has_var_args = any(
        sig.parameters[n].kind is inspect.Parameter.VAR_POSITIONAL and v for n, v in bound.arguments.items()
    )
    out_args: Tuple[Any, ...] = ()
    out_kwargs: Dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out_args = out_args + tuple(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out_kwargs.update(value)
        elif kind is inspect.Parameter.POSITIONAL_ONLY or (
            has_var_args and kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ):
            out_args = out_args + (value,)
        else:
            out_kwargs[name] = value
    return out_args, out_kwargs


class _Arg:
    """Stands for the call's own argument while a call form's plan is worked out."""

    __slots__ = ("source",)

    def __init__(self, source: Any) -> None:
        self.source = source  # an int (position) or a str (keyword)


class InputBinder:
    """:func:`canonical_inputs` for one module, memoized per call form.

    How a call binds depends only on its form: how many positional arguments, and which
    keywords in which order. The first call of a form binds placeholders to learn where
    each canonical argument comes from; later calls of that form just pick their values
    (``sig.bind`` costs more than an opaque module's routing otherwise: issue 10's
    skip-compilation overhead).
    """

    def __init__(self, module: torch.nn.Module, signature: Optional[inspect.Signature] = None) -> None:
        self.module = module
        self.signature = signature if signature is not None else inspect.signature(module.forward)
        self._plans: Dict[Tuple[Any, ...], Tuple[Tuple[Any, ...], Tuple[Tuple[str, Any], ...]]] = {}

    def __call__(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Inputs:
        form = (len(args), *kwargs)
        plan = self._plans.get(form)
        if plan is None:
            placeholders = tuple(_Arg(i) for i in range(len(args)))
            named = {k: _Arg(k) for k in kwargs}
            out_args, out_kwargs = canonical_inputs(self.module, placeholders, named, self.signature)
            plan = (tuple(a.source for a in out_args), tuple((k, v.source) for k, v in out_kwargs.items()))
            self._plans[form] = plan
        positional, keywords = plan
        return (
            tuple(args[src] if type(src) is int else kwargs[src] for src in positional),
            {name: args[src] if type(src) is int else kwargs[src] for name, src in keywords},
        )


def flat_inputs(inputs: Inputs) -> Tuple[List[Any], Any]:
    """Leaves and spec of canonical inputs as graphs take them: a key/value cache argument
    counts as its tensors (see :mod:`graphpatch_cache.integrations.kv_cache`)."""
    return _compat.tree_flatten(kv_cache.as_states(inputs))


def call_signature(inputs: Inputs, dynamic_dims: DynamicDims = None) -> Dict[str, Any]:
    """The signature of canonical inputs. ``dynamic_dims[i][d]`` says whether dim ``d`` of
    tensor leaf ``i`` was traced symbolically, and what it serves (:data:`DynamicDims`;
    default: all dims symbolic, sizes >= 2)."""
    leaves, spec = flat_inputs(inputs)
    return _signature(leaves, spec, dynamic_dims)


def concrete_signature(inputs: Inputs) -> Dict[str, Any]:
    """The signature of an actual call: every dimension concrete."""
    leaves, spec = flat_inputs(inputs)
    return _signature(leaves, spec, _concrete_dims(leaves))


def _concrete_dims(leaves: Sequence[Any]) -> List[Optional[List[bool]]]:
    return [[False] * x.dim() for x in leaves if isinstance(x, torch.Tensor)]


def _signature(leaves: Sequence[Any], spec: Any,
               dynamic_dims: DynamicDims) -> Dict[str, Any]:
    out: List[Dict[str, Any]] = []
    t = 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            dyn = dynamic_dims[t] if dynamic_dims is not None and t < len(dynamic_dims) else None
            t += 1
            dims: List[Any] = []
            for d, size in enumerate(leaf.shape):
                is_dyn = True if dyn is None else dyn[d]
                if is_dyn == "dyn1" and size >= 1:  # (see extraction/sizes.py)
                    dims.append("dyn1")
                else:
                    dims.append("dyn" if is_dyn and size > 1 else int(size))
            out.append(
                {
                    "kind": "tensor",
                    "dtype": str(leaf.dtype).removeprefix("torch."),
                    "device": leaf.device.type,
                    "dims": dims,
                }
            )
        else:
            out.append({"kind": "const", "value": constant_value(leaf)})
    return {"spec": _compat.treespec_dumps(spec), "leaves": out}


@dataclass(frozen=True, eq=False)
class CallInputs:
    """One call's inputs, canonicalized once (:func:`canonical_inputs`) and flattened once
    (:func:`flat_inputs`); the concrete signature is computed on first use.

    Build it with :meth:`of`; the key (:func:`~graphpatch_cache.cache.keys.key_material`),
    the store lookup and :func:`~graphpatch_cache.extraction.extract` all take it.
    """

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    leaves: Tuple[Any, ...]
    spec: Any

    @classmethod
    def of(cls, module: torch.nn.Module, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
           signature: Optional[inspect.Signature] = None) -> "CallInputs":
        """The canonical inputs of ``module(*args, **kwargs)``.

        :raises TypeError: ``module.forward`` does not accept them.
        """
        canonical = canonical_inputs(module, tuple(args), dict(kwargs or {}), signature)
        leaves, spec = flat_inputs(canonical)
        return cls(canonical[0], canonical[1], tuple(leaves), spec)

    @property
    def canonical(self) -> Inputs:
        """``(args, kwargs)``, as :func:`canonical_inputs` returns them."""
        return self.args, self.kwargs

    def signature(self, dynamic_dims: DynamicDims = None) -> Dict[str, Any]:
        """:func:`call_signature` of these inputs."""
        return _signature(self.leaves, self.spec, dynamic_dims)

    @functools.cached_property
    def concrete_signature(self) -> Dict[str, Any]:
        """:func:`concrete_signature` of these inputs (computed once)."""
        return _signature(self.leaves, self.spec, _concrete_dims(self.leaves))


def input_names(inputs: Inputs) -> List[str]:
    """Readable names of the leaves of canonical inputs (``attention_mask``, ``args[0]``)."""
    out = []
    for path, _ in _compat.tree_flatten_with_path(kv_cache.as_states(inputs))[0]:
        keys = [getattr(k, "idx", getattr(k, "key", getattr(k, "name", k))) for k in path]
        head = f"args[{keys[1]}]" if keys[0] == 0 else str(keys[1])
        out.append(head + "".join(f"[{k!r}]" for k in keys[2:]))
    return out


def mismatch(matcher: SignatureMatcher, inputs: Inputs) -> str:
    """A sentence naming the first input of ``inputs`` that differs from ``matcher``'s
    extraction call."""
    return describe_mismatch(matcher.signature, concrete_signature(inputs), input_names(inputs))


__all__ = ["CallInputs", "InputBinder", "Inputs", "call_signature", "canonical_inputs", "concrete_signature",
           "flat_inputs", "input_names", "mismatch"]
