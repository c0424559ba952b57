"""Module-call markers: how one flat dynamo graph keeps the model's module hierarchy.

During extraction every module's ``forward`` is wrapped (see :meth:`Recorder.__enter__`).
In an ordinary (eager) call the wrapper *records* the call: which module, its inputs'
structure and names, its output's structure. While dynamo traces it instead routes the
call's tensors through two marker operators, ``graphpatch_cache::enter`` and
``graphpatch_cache::exit``, so the flat graph shows exactly where each module call starts
and ends and which values cross the boundary. :mod:`.split` turns the markers back into
one graph per module call and removes them; they never reach an artifact or run at patch
time.

What a call record holds is in :mod:`.records`, how values pass through a marker in
:mod:`.routing`, and the outputs of opaque calls (traced as one ``opaque`` marker) in
:mod:`.opaque`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from .. import _compat, progress
from ..integrations import accelerate, kv_cache
from ..integrations.bitsandbytes import leaf_handler
from .opaque import OpaqueOutputs
from .records import CallRecord, TensorMeta, leaf_locations, leaf_names
# the forward wrapper's own lines (calls of ``_route``) are the source stored for marker nodes
from .routing import route as _route

# torch.library is untyped: held as Any so that type checking does not flag each call
_library: Any = torch.library
_LIB = _library.Library("graphpatch_cache", "DEF")
_LIB.define("enter(str tag, Tensor[] xs) -> Tensor[]")
_LIB.define("exit(str tag, Tensor[] xs) -> Tensor[]")
# ``ints``: the Python ints the opaque call is given, symbolic where the trace has sizes; the
# fake run takes them as they are, and the stored call takes each traced size as a graph value
_LIB.define("opaque(str tag, Tensor[] xs, SymInt[] ints) -> Tensor[]")


def _clone_all(tag: str, xs: List[torch.Tensor]) -> List[torch.Tensor]:
    return [x.clone() for x in xs]


def _empty_like_all(tag: str, xs: List[torch.Tensor]) -> List[torch.Tensor]:
    return [torch.empty_like(x) for x in xs]


def _enter_traced(tag: str, xs: List[torch.Tensor]) -> List[torch.Tensor]:
    # dynamo runs this (on meta tensors) as it traces each module call's enter marker: the
    # count of module calls traced so far that the extraction's progress shows
    progress.step()
    return _clone_all(tag, xs)


def _enter_fake(tag: str, xs: List[torch.Tensor]) -> List[torch.Tensor]:
    progress.step()
    return _empty_like_all(tag, xs)


_LIB.impl("enter", _enter_traced, "CompositeExplicitAutograd")
torch.library.register_fake("graphpatch_cache::enter", _enter_fake, lib=_LIB)
_LIB.impl("exit", _clone_all, "CompositeExplicitAutograd")
torch.library.register_fake("graphpatch_cache::exit", _empty_like_all, lib=_LIB)

ENTER = torch.ops.graphpatch_cache.enter.default
EXIT = torch.ops.graphpatch_cache.exit.default
OPAQUE = torch.ops.graphpatch_cache.opaque.default
_compat.has_side_effect(ENTER)
_compat.has_side_effect(EXIT)
_compat.has_side_effect(OPAQUE)

_MISSING = object()

# The opaque operator's outputs are known only from the eager recording; the active recorder
# supplies them (see Recorder.opaque_outputs).
_ACTIVE: List["Recorder"] = []


def _opaque_eager(tag: str, xs: List[torch.Tensor], ints: List[int]) -> List[torch.Tensor]:  # pragma: no cover
    raise RuntimeError("graphpatch_cache::opaque only exists while extracting")


def _opaque_fake(tag: str, xs: List[torch.Tensor], ints: List[Any]) -> List[torch.Tensor]:
    progress.step()  # an opaque call is one module call traced (see _enter_traced)
    return _ACTIVE[-1].opaque_outputs(tag, xs, ints)


_LIB.impl("opaque", _opaque_eager, "CompositeExplicitAutograd")
torch.library.register_fake("graphpatch_cache::opaque", _opaque_fake, lib=_LIB)


class Recorder(OpaqueOutputs):
    """Installs the marker hooks on every module of ``model`` for the duration of a ``with``.

    :ivar calls: the eager calls recorded, in call order.
    """

    def __init__(self, model: torch.nn.Module, opaque_modules: FrozenSet[int] = frozenset()) -> None:
        self.model = model
        self.modules_by_tag: Dict[str, torch.nn.Module] = {}
        self.calls: List[CallRecord] = []
        self._stack: List[int] = []
        self.opaque_modules = opaque_modules  # ids of modules traced as one opaque call
        self._saved_forwards: Dict[int, Any] = {}
        self.tracing = False  # False: record eager calls; True: emit markers for dynamo
        self.cache_class = kv_cache.cache_class()  # key/value caches are routed as tensors
        #: the cache the model's own call created (its layers' key/value dtypes), when it was
        #: called without one; with ``inject_cache`` the trace hands the model an equal one
        #: (see :func:`kv_cache.empty_cache`)
        self.created_cache: Optional[kv_cache.LayerDtypes] = None
        self.inject_cache = False
        #: whether the eager recording saw a cache object at all (else the trace skips the
        #: search for caches in every call's inputs and outputs)
        self.saw_cache = False
        #: the sliding-window lengths of the cache the model's call took, and why its graph is
        #: fixed to the example's sizes, if it is (see :func:`kv_cache.skipped_window_mask`)
        self.window_lengths: List[int] = []
        self.window_fixed: Optional[str] = None
        self._init_opaque()  # faking, specialized, data_dependent: see OpaqueOutputs

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        """Wrap every module's ``forward`` (an instance attribute, removed on exit).

        Wrapping ``forward`` rather than registering forward hooks keeps dynamo on its fast
        path through ``Module.__call__``; with hooks on every module the trace took ~40%
        longer on GPT-2.
        """
        counter = itertools.count()
        try:
            for _, module in self.model.named_modules(remove_duplicate=True):
                tag = f"m{next(counter)}"
                self.modules_by_tag[tag] = module
                self._saved_forwards[id(module)] = module.__dict__.get("forward", _MISSING)
                module.forward = self._wrapped_forward(tag, module, module.forward)
        except BaseException:
            self.restore_forwards()
            raise
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore_forwards()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def reset_calls(self) -> None:
        self.calls.clear()
        self._stack.clear()
        self._opaque_counts.clear()

    def traced_calls(self) -> int:
        """How many of the recorded calls the trace goes through: all but those made inside
        an opaque call (which is traced as one)."""
        inside = [False] * len(self.calls)
        for record in self.calls:  # a parent is recorded before its children
            parent = record.parent
            inside[record.index] = parent is not None and (
                inside[parent] or id(self.calls[parent].module) in self.opaque_modules)
        return inside.count(False)

    def restore_forwards(self) -> None:
        for tag, module in self.modules_by_tag.items():
            saved = self._saved_forwards.pop(id(module), None)
            if saved is None:
                continue
            if saved is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved

    # -- the wrapper -------------------------------------------------------------------------
    def _wrapped_forward(self, tag: str, module: torch.nn.Module, forward: Any) -> Callable[..., Any]:
        recorder = self
        handler = leaf_handler(module)
        # accelerate hooks (offloading, device alignment) cannot be traced: dynamo sees the
        # module's own forward, and the runtime runs the hooks around the module's graph
        traced_forward = accelerate.original_forward(module, forward)

        def forward_with_markers(*args: Any, **kwargs: Any) -> Any:
            if recorder.faking:
                if handler is not None:
                    leaves = [x for x in _compat.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
                    return handler.fake_outputs(module, leaves)[0]
                return traced_forward(*args, **kwargs)
            if not recorder.tracing:
                recorder._record_enter(tag, module, args, kwargs, forward)
                if handler is not None:
                    # leaf modules are never traced: the recording needs only their output's
                    # shape (and a quantized layer cannot run on the meta device)
                    leaves = [x for x in _compat.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
                    output = handler.fake_outputs(module, leaves)[0].zero_()
                elif id(module) in recorder.opaque_modules:
                    # An opaque module runs eagerly at patch time, where libraries take their
                    # eager paths (transformers leaves the sdpa mask None): record it, and the
                    # calls it makes of its children, the same way.
                    with _compat.not_compiling():
                        output = forward(*args, **kwargs)
                else:
                    output = forward(*args, **kwargs)
                recorder._record_exit(tag, output)
                return output
            if id(module) in recorder.opaque_modules:
                return recorder._opaque_call(tag, args, kwargs)
            # A key/value cache enters as tensors at the model's own call only; below it the
            # cache object is the model's (the splitter threads the tensors it holds). Every
            # call that returns a cache returns its tensors.
            caches = recorder.cache_class if recorder.saw_cache else None
            args, kwargs = _route(ENTER, tag, (args, kwargs), caches if module is recorder.model else None)
            if module is recorder.model and recorder.inject_cache and recorder.created_cache is not None:
                kwargs = recorder._with_cache(traced_forward, args, kwargs)
            return _route(EXIT, tag, traced_forward(*args, **kwargs), caches)

        return forward_with_markers

    def _with_cache(self, forward: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        name = kv_cache.cache_argument(forward)
        if name is None or kwargs.get(name) is not None:
            return kwargs
        # only models traced on the meta device get one (see capture)
        assert self.created_cache is not None
        return dict(kwargs, **{name: kv_cache.empty_cache(self.created_cache, torch.device("meta"))})

    def _opaque_call(self, tag: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        spec, template, is_tensor = self._opaque_templates[tag]
        leaves, _ = _compat.tree_flatten((args, kwargs))
        # every int leaf goes to the marker: dynamo answers isinstance(size, torch.SymInt) with
        # False, and the fake kernel sees which ones are symbolic
        outs = OPAQUE(tag, [leaves[i] for i in range(len(leaves)) if isinstance(leaves[i], torch.Tensor)],
                      [leaves[i] for i in range(len(leaves))
                       if isinstance(leaves[i], (int, torch.SymInt)) and not isinstance(leaves[i], bool)])
        out_leaves = []
        j = 0
        for i in range(len(template)):
            if is_tensor[i]:
                out_leaves.append(outs[j])
                j += 1
            else:
                out_leaves.append(template[i])
        return _compat.tree_unflatten(out_leaves, spec)

    def _record_enter(self, tag: str, module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], forward: Any) -> None:
        originals = (args, kwargs)
        if module is self.model:  # the model's own call takes a cache's tensors (see _route)
            states = kv_cache.as_states(originals)
            self.saw_cache = self.saw_cache or states is not originals
            self.window_lengths = kv_cache.window_lengths(originals)
            args, kwargs = states
        leaves, spec = _compat.tree_flatten((args, kwargs))
        record = CallRecord(
            index=len(self.calls),
            tag=tag,
            module=module,
            parent=self._stack[-1] if self._stack else None,
            input_spec=spec,
            input_names=leaf_names(forward, args, kwargs),
            input_locations=leaf_locations(forward, args, kwargs),
            input_leaves=[None if isinstance(x, torch.Tensor) else x for x in leaves],
            input_is_tensor=[isinstance(x, torch.Tensor) for x in leaves],
        )
        if record.parent is not None:
            self.calls[record.parent].children.append(record.index)
            if id(self.calls[record.parent].module) in self.opaque_modules:
                record.inputs = (originals[0], dict(originals[1]))
        if id(module) in self.opaque_modules and module is not self.model:
            record.inputs = (originals[0], dict(originals[1]))  # (see opaque_outputs)
        self.calls.append(record)
        self._stack.append(record.index)

    def _record_exit(self, tag: str, output: Any) -> None:
        record = self.calls[self._stack.pop()]
        assert record.tag == tag, "module calls did not nest"
        made = kv_cache.caches_in(output)
        record.returns_cache = bool(made)
        self.saw_cache = self.saw_cache or record.returns_cache
        if record.module is self.model and len(made) == 1:
            self.window_fixed = kv_cache.skipped_window_mask(self.window_lengths, made[0])
            given = [x for x in record.input_leaves if isinstance(x, (self.cache_class, kv_cache.CacheState))]
            if not given:
                self.created_cache = kv_cache.created_layers(made[0])
        leaves, spec = _compat.tree_flatten(kv_cache.as_states(output))
        record.output_spec = spec
        record.output_leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        record.output_is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        record.output_meta = [
            TensorMeta(tuple(x.shape), x.dtype, x.device, tuple(x.stride())) if isinstance(x, torch.Tensor) else None
            for x in leaves
        ]


__all__ = ["ENTER", "EXIT", "OPAQUE", "Recorder"]
