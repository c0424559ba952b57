"""Fake outputs of opaque module calls: what the trace gets where dynamo does not go.

An opaque module (one dynamo cannot trace, a leaf module, a class the options skip) appears
in the flat graph as one ``graphpatch_cache::opaque`` marker call. Its fake kernel asks the
active recorder for the call's outputs (:meth:`OpaqueOutputs.opaque_outputs`): from the
module's leaf handler, else from running its forward on the trace's fake (symbolic) inputs
(:meth:`OpaqueOutputs.fake_forward`), else with the example call's concrete sizes (the
graphs around it are then size-specialized). Sizes the call takes as Python ints reach the
fake run as the trace's symbolic ints (and the stored call as graph values, see
``frames.build_opaque``), so they keep the graphs generic too.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import _compat
from ..integrations import kv_cache
from ..integrations.bitsandbytes import leaf_handler
from .records import CallRecord, int_positions

_MISSING = object()

#: an opaque module's output structure, fixed before tracing: (spec, leaves, is_tensor)
Template = Tuple[Any, List[Any], List[bool]]
_ModuleState = List[Tuple[Dict[str, Any], Dict[str, Any]]]


class OpaqueOutputs:
    """The opaque-call half of :class:`~.markers.Recorder` (a mixin): the recorder's eager
    records answer for the calls dynamo does not trace."""

    calls: List[CallRecord]
    modules_by_tag: Dict[str, torch.nn.Module]
    opaque_modules: FrozenSet[int]

    def _init_opaque(self) -> None:
        self._opaque_counts: Dict[str, int] = {}
        self._opaque_templates: Dict[str, Template] = {}
        #: > 0 while an opaque module's forward runs on fake tensors (see fake_forward): the
        #: wrapped forwards then only call through, recording and marking nothing
        self.faking = 0
        #: index of each opaque call whose fake outputs had to take the eager call's concrete
        #: sizes -> why (the graphs around it are then specialized to the example's sizes)
        self.specialized: Dict[int, str] = {}
        #: index of each opaque call whose run on fakes needed the example's data -> why
        self.data_dependent: Dict[int, str] = {}

    def prepare_opaque(self) -> None:
        """Fix each opaque module's output structure (from the eager recording) before tracing."""
        self._opaque_templates = {}
        for tag, module in self.modules_by_tag.items():
            if id(module) not in self.opaque_modules:
                continue
            records = [c for c in self.calls if c.tag == tag]
            if not records:
                continue
            first = records[0]
            for other in records[1:]:
                if other.output_spec != first.output_spec or other.output_leaves != first.output_leaves:
                    raise ValueError(f"opaque module {tag} returns differently structured outputs per call")
            self._opaque_templates[tag] = (first.output_spec, list(first.output_leaves), list(first.output_is_tensor))

    def _opaque_record(self, tag: str) -> CallRecord:
        k = self._opaque_counts.get(tag, 0)
        matches = [c for c in self.calls if c.tag == tag]
        self._opaque_counts[tag] = k + 1
        return matches[min(k, len(matches) - 1)]

    def opaque_outputs(self, tag: str, xs: List[torch.Tensor], ints: Sequence[Any] = ()) -> List[torch.Tensor]:
        """Fake outputs for the k-th traced call of an opaque module.

        From its leaf handler where it has one; else from running the module's forward on the
        fake (symbolic) inputs, so the graphs around it stay shape-generic (``ints``: its int
        leaves as the trace has them, sizes symbolic); else (the run on fakes fails, or it takes
        or returns what a graph cannot hold symbolically) empty tensors with the metadata of
        the k-th eager call, and the call is listed in :attr:`specialized`.
        """
        record = self._opaque_record(tag)
        handler = leaf_handler(record.module)
        if handler is not None:
            return handler.fake_outputs(record.module, list(xs))
        if len(ints) != len(int_positions(record)):
            return self._eager_outputs(record, "takes Python ints the trace did not pass to the call")
        if record.returns_cache or any(kv_cache.is_cache(x) or isinstance(x, kv_cache.CacheState)
                                       for x in record.input_leaves):
            # (split refuses such a call: an opaque call cannot pass a key/value cache object)
            return self._eager_outputs(record, "takes or returns a key/value cache")
        if any(type(x) in (int, float) for x in record.output_leaves):
            return self._eager_outputs(record, "returns Python numbers, which the graphs around it hold as constants")
        try:
            return self.fake_forward(record, list(xs), ints=ints)
        except Exception as exc:  # any failure of the fake run: data-dependent code, unsupported ops...
            error = exc
        real = _real_inputs(record, len(xs))
        if real is not None:
            # A branch on data (`if h.sum() > 0`) cannot be decided on fakes: run again with
            # the example call's real values alongside (fake tensors' real-tensor
            # propagation), so data questions get the example's answer and sizes stay symbolic.
            try:
                outs = self.fake_forward(record, list(xs), real_inputs=real, ints=ints)
            except Exception as exc:
                error = exc
            else:
                self.data_dependent[record.index] = (
                    "decides on data, which the run on fake inputs answered as the example call did "
                    f"({type(error).__name__}); its outputs' sizes were found symbolic")
                return outs
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return self._eager_outputs(record, f"its outputs' sizes are known only from the example call "
                                           f"({type(error).__name__}: {first[:200]})")

    def _eager_outputs(self, record: CallRecord, why: str) -> List[torch.Tensor]:
        self.specialized[record.index] = why
        return [
            torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=m.device)
            for m in record.output_meta
            if m is not None
        ]

    def fake_forward(self, record: CallRecord, xs: List[torch.Tensor], fake_mode: Any = None,
                     real_inputs: Optional[List[torch.Tensor]] = None, ints: Sequence[Any] = ()) -> List[torch.Tensor]:
        """The tensor outputs of ``record``'s module called on fake inputs ``xs`` (in the order
        of its tensor input leaves) and the recorded non-tensor inputs, with its parameters and
        buffers as fakes of the active fake mode. Children's wrapped forwards only call through
        while it runs, and everything the forward may change on the modules is put back. With
        ``real_inputs`` (the example call's tensors, one per fake), questions about data are
        answered from real values computed alongside. ``ints`` (when given): the call's int
        leaves in order (see :func:`.records.int_positions`), symbolic where the trace has sizes.

        :raises ValueError: the outputs do not match the eager call's (count, dtype, or sizes
            at the example's values).
        """
        mode = fake_mode or _compat.detect_fake_mode(xs) or _compat.detect_fake_mode()
        if mode is None:
            raise RuntimeError("no fake tensor mode is active")
        module = record.module
        args, kwargs = _call_inputs(record, xs, ints)
        tensors, reals = _fake_tensors(module, mode)
        if real_inputs is not None:
            reals.extend(zip(xs, real_inputs))
        saved = _module_state(module)
        self.faking += 1
        try:
            with _fake_mode_settings(mode, reals if real_inputs is not None else None):
                # symbols the run makes for data (`u0`) are ours, not outputs of the traced op
                fresh = getattr(getattr(mode, "shape_env", None), "ignore_fresh_unbacked_symbols", None)
                ignore = fresh() if fresh is not None else contextlib.nullcontext()
                _drop_forward_hooks(module)
                with mode, _compat.not_compiling(), ignore, _compat.quiet_symbolic_shapes_log():
                    out = torch.func.functional_call(module, tensors, tuple(args), dict(kwargs), strict=False)
        finally:
            self.faking -= 1
            _restore_module_state(saved)
        return _checked_outputs(record, out, real_inputs is not None)


def _real_inputs(record: CallRecord, count: int) -> Optional[List[torch.Tensor]]:
    """The example call's tensor inputs (kept for an opaque module's own calls), one per fake."""
    if record.inputs is None:
        return None
    real = [x for x in _compat.tree_leaves(record.inputs) if isinstance(x, torch.Tensor)]
    return real if len(real) == count else None


def _call_inputs(record: CallRecord, xs: List[torch.Tensor], ints: Sequence[Any] = ()) -> Tuple[Any, Any]:
    """``(args, kwargs)`` of the recorded call with the fakes ``xs`` as its tensor leaves, and
    ``ints`` (when given) as its int leaves."""
    it = iter(xs)
    leaves = [next(it) if t else c for c, t in zip(record.input_leaves, record.input_is_tensor)]
    if ints:
        for i, n in zip(int_positions(record), ints):
            leaves[i] = n
    args, kwargs = _compat.tree_unflatten(leaves, record.input_spec)
    return args, kwargs


def _fake_tensors(module: torch.nn.Module, mode: Any) -> Tuple[Dict[str, Any], List[Tuple[Any, torch.Tensor]]]:
    """Fakes of the module's parameters and buffers (by qualified name), and (fake, real)
    pairs for real-tensor propagation."""
    tensors = {}
    reals: List[Tuple[Any, torch.Tensor]] = []  # (fake, real) pairs to attach
    for name, value in list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False)):
        tensors[name] = mode.from_tensor(value, static_shapes=True)
        reals.append((tensors[name], value))
    return tensors, reals


@contextlib.contextmanager
def _fake_mode_settings(mode: Any, reals: Optional[List[Tuple[Any, torch.Tensor]]]) -> Iterator[None]:
    """The fake mode set up for one run (restored after): no dispatch cache, and with ``reals``
    the real tensors attached to their fakes and propagated."""
    # fake tensor's dispatch cache costs more than it saves on a one-off run with symbolic
    # sizes (a tiny GPT-2 on fakes: 3.5 s with it, 1.7 s without)
    settings = {"cache_enabled": False, "propagate_real_tensors": reals is not None}
    previous = {k: getattr(mode, k) for k in settings if hasattr(mode, k)}
    attached = [(fake, getattr(fake, "real_tensor", None)) for fake, _ in reals] if reals is not None else []
    try:
        for k in previous:
            setattr(mode, k, settings[k])
        for fake, real in reals or ():
            setattr(fake, "real_tensor", real)
        yield
    finally:
        for fake, old in attached:
            setattr(fake, "real_tensor", old)
        for k, v in previous.items():
            setattr(mode, k, v)


def _drop_forward_hooks(module: torch.nn.Module) -> None:
    """Forward hooks stay out of the run: transformers' output recorders would add the fakes
    to the hidden states being collected by the trace around it (the tables come back with
    the module state, see :func:`_module_state`)."""
    for m in module.modules():
        m._forward_hooks = collections.OrderedDict()
        m._forward_pre_hooks = collections.OrderedDict()


def _checked_outputs(record: CallRecord, out: Any, propagated: bool) -> List[torch.Tensor]:
    """The run's tensor outputs, checked against the eager call's (count, dtype, sizes at the
    example's values)."""
    outs = [x for x in _compat.tree_leaves(kv_cache.as_states(out)) if isinstance(x, torch.Tensor)]
    metas = [m for m in record.output_meta if m is not None]
    if len(outs) != len(metas):
        raise ValueError(f"{len(outs)} tensor outputs on fake inputs, {len(metas)} in the example call")
    for fake, meta in zip(outs, metas):
        hints = [_hint(s) for s in fake.shape]
        if fake.dtype != meta.dtype or tuple(hints) != tuple(meta.shape):
            raise ValueError(f"an output of {fake.dtype} {tuple(hints)} on fake inputs, "
                             f"{meta.dtype} {tuple(meta.shape)} in the example call")
        if propagated and hasattr(fake, "real_tensor"):
            setattr(fake, "real_tensor", None)  # (dynamo's mode does not propagate; keep nothing alive)
    return outs


def _hint(size: Any) -> Optional[int]:
    """A size's value at the example (None for a data-dependent size)."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return None if hint is None else int(hint)
    return int(size)


def _module_state(module: torch.nn.Module) -> _ModuleState:
    """Shallow copies of every submodule's attribute tables (``__dict__``, parameters,
    buffers, children): a forward run on fake tensors may cache values on its module
    (``self.cached = mask``), which must not outlive the run (nor the hook tables it swaps
    out, see fake_forward)."""
    state = []
    for m in module.modules():
        for table in (m.__dict__, m._parameters, m._buffers, m._modules):
            state.append((table, dict(table)))
    return state


def _restore_module_state(state: _ModuleState) -> None:
    for table, saved in state:
        if len(table) != len(saved) or any(table.get(k, _MISSING) is not v for k, v in saved.items()):
            table.clear()
            table.update(saved)


__all__ = ["OpaqueOutputs", "Template"]
