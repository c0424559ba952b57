"""Capture: one eager call to record the module calls, one dynamo trace of the whole model.

The trace runs with ``fullgraph=True`` and ``dynamic=True`` (graphs stay shape-generic) and
stops as soon as the backend has the graph: the captured graph is never run. When dynamo
cannot trace some module, that module's class is marked opaque and the capture is retried;
an opaque module appears in the graph as one call whose outputs come from running its
forward on the trace's fake, symbolic inputs (see :meth:`Recorder.opaque_outputs`).

When the model itself is opaque (``skip_compilation``) there is nothing to trace: the graph
is built directly (:func:`_capture_opaque_root`), with no dynamo at all.
"""

from __future__ import annotations

import contextlib
import operator
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

import torch

from .. import _compat, progress
from ..errors import ExtractionError
from ..integrations import accelerate, kv_cache
from ..integrations.bitsandbytes import leaf_handler
from ..options import ExtractionOptions
from .autograd_functions import inline_autograd_functions
from .markers import OPAQUE, Recorder
from ..artifact.names import join_path


class _StopAfterCapture(Exception):
    """Raised by the capturing backend's compiled function so the graph never runs."""


class _CaptureRoot(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        return self.model(*args, **kwargs)


@dataclass
class Capture:
    graph: torch.fx.Graph
    example_inputs: List[Any]
    recorder: Recorder
    opaque: Set[int]  # ids of modules traced as opaque calls
    failures: Dict[str, str]  # module path -> why it is opaque
    #: id of each tensor dynamo saw -> its qualified names (the meta stand-ins while a
    #: hooked model is traced on the meta device)
    tensor_names: Dict[int, List[str]]
    #: the graph holds nothing that depends on sizes (an opaque model): every size may vary
    generic: bool = False
    #: ``_compat.shape_facts`` of a trace with size-oblivious sizes (None: sizes 0 and 1 were
    #: specialized as dynamo does by default), read by :mod:`.sizes`
    shape_facts: Optional[Any] = None


def _tensor_names(model: torch.nn.Module) -> Dict[int, List[str]]:
    names: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(b), []).append(name)
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("__"):
                names.setdefault(id(value), []).append(join_path(mname, attr))
    return names


@contextlib.contextmanager
def _meta_view(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily give every parameter and buffer a meta-device stand-in (restored after).

    An accelerate-dispatched model has offloaded weights on the meta device and the rest on
    real devices, which fake tensors refuse to mix. Its structure is traced entirely on the
    meta device instead; the runtime runs the hooks (and reads the real weights) later.
    """
    saved: List[Tuple[Dict[str, Any], str, torch.Tensor]] = []
    try:
        for module in model.modules():
            tables: Tuple[Dict[str, Any], Dict[str, Any]] = (module._parameters, module._buffers)
            for store in tables:
                for name, value in list(store.items()):
                    if value is None:
                        continue
                    saved.append((store, name, value))
                    meta = value.detach().to("meta")
                    store[name] = torch.nn.Parameter(meta, requires_grad=value.requires_grad) if isinstance(
                        value, torch.nn.Parameter) else meta
        yield
    finally:
        for store, name, value in reversed(saved):
            store[name] = value


def _to_meta(value: Any) -> Any:
    leaves, spec = _compat.tree_flatten(value)
    return _compat.tree_unflatten([x.to("meta") if isinstance(x, torch.Tensor) else x for x in leaves], spec)


def _module_forward_spans(model: torch.nn.Module) -> Dict[Tuple[str, int, int], List[torch.nn.Module]]:
    """Map (filename, first line, last line) of each module class's forward to its modules."""
    spans: Dict[Tuple[str, int, int], List[torch.nn.Module]] = {}
    for module in model.modules():
        fn = getattr(type(module).forward, "__code__", None)
        if fn is None:
            continue
        first = fn.co_firstlineno
        last = max((ln for _, _, ln in fn.co_lines() if ln is not None), default=first)
        spans.setdefault((fn.co_filename, first, last), []).append(module)
    return spans


def _culprit_modules(exc: BaseException, model: torch.nn.Module, opaque: Set[int]) -> List[torch.nn.Module]:
    """The innermost module(s) whose forward was being traced when dynamo gave up."""
    frames = list(getattr(exc, "real_stack", None) or [])
    tb = exc.__traceback__
    if not frames:
        frames = traceback.extract_tb(tb)
    spans = _module_forward_spans(model)
    for frame in reversed(frames):
        for (filename, first, last), modules in spans.items():
            if frame.filename == filename and first <= (frame.lineno or 0) <= last:
                candidates = [m for m in modules if id(m) not in opaque]
                if candidates:
                    return candidates
    return []


def _capture_opaque_root(model: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], opaque: Set[int],
                         failures: Dict[str, str]) -> Capture:
    """The capture of a model that is opaque itself, built without dynamo.

    Its graph is one opaque call, so there is nothing to trace: the graph dynamo would give
    (placeholders, the opaque marker, the outputs) is written directly, its inputs faked with
    a symbol per size and its outputs from the forward run on those fakes. One eager call
    records the module calls (and the inputs of each call the model makes of its children,
    which are extracted the same way, see ``extraction._with_opaque_children``).
    """
    graph = torch.fx.Graph()
    progress.phase("eager recording")
    with Recorder(model, frozenset(opaque)) as recorder:
        eager_args, eager_kwargs = kv_cache.copy_caches((args, kwargs))
        with torch.no_grad(), _compat.pretend_compiling():
            model(*eager_args, **eager_kwargs)
        record = recorder.calls[0]
        leaves = _compat.tree_flatten(kv_cache.as_states((args, kwargs)))[0]
        inputs = [x for x in leaves if isinstance(x, torch.Tensor)]
        placeholders = []
        for i, x in enumerate(inputs):
            ph = graph.placeholder(f"input_{i}")
            ph.meta["example_value"] = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
            placeholders.append(ph)
        # The opaque graph calls the module as it is, whatever the sizes: the sizes of its
        # inputs and outputs are metadata only (`_shape`), here the example call's, as in
        # graphpatch. (Symbolic ones would need the forward run on fakes with symbolic sizes,
        # which costs about as much as a dynamo trace, and again for every opaque child
        # extracted below it.)
        outs = [torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")
                for m in record.output_meta if m is not None]
    call = graph.call_function(OPAQUE, (record.tag, placeholders, []))
    call.meta["example_value"] = outs
    items = []
    for i, out in enumerate(outs):
        item = graph.call_function(operator.getitem, (call, i))
        item.meta["example_value"] = out
        items.append(item)
    graph.output(tuple(items))
    return Capture(graph, inputs, recorder, set(opaque), dict(failures), _tensor_names(model), generic=True)


def capture(
    model: torch.nn.Module,
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    options: ExtractionOptions,
    opaque: Optional[Set[int]] = None,
    failures: Optional[Dict[str, str]] = None,
) -> Capture:
    """Trace ``model(*args, **kwargs)`` into one flat fx graph with module-call markers.

    :raises ExtractionError: when tracing fails and no module can be made opaque, or when
        ``options.error_on_compilation_failure`` is set.
    """
    opaque = set(opaque or ())
    failures = dict(failures or {})
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=True)}
    for module in model.modules():
        if (
            leaf_handler(module) is not None
            or options.skip_compilation
            or isinstance(module, options.classes_to_skip_compiling)
            or type(module) in options.custom_extraction_functions
        ):
            opaque.add(id(module))
    if id(model) in opaque and leaf_handler(model) is None:
        return _capture_opaque_root(model, args, kwargs, opaque, failures)
    root = _CaptureRoot(model)
    hooked = accelerate.is_hooked(model)
    # traced on the meta device (hooked models; builds from a config): see kv_cache.empty_cache
    on_meta = hooked or any(p.device.type == "meta" for p in model.parameters())
    tries = 0
    for _ in range(64):
        # Size-oblivious sizes first (a graph that may serve size 1 too, see .sizes); where
        # that trace fails (transformers' sdpa path passes a symbolic bool for a length traced
        # at 1, as in a key/value cache's decode step), again with the example's sizes of 1
        # specialized; then the default trace, which specializes sizes 0 and 1. Where all
        # fail, the default trace's error names the culprit.
        error: Optional[BaseException] = None
        for oblivious, ones_static in _attempts(args, kwargs):
            # a retry says why on its progress lines (else they would seem to start over)
            why = ("sizes of 1 kept fixed" if ones_static else "dynamo's default sizes" if not oblivious
                   else f"{len(failures)} failing module(s) opaque")
            result = _trace(model, root, args, kwargs, opaque, failures, hooked=hooked, on_meta=on_meta,
                            size_oblivious=oblivious, ones_static=ones_static, label=f" (again: {why})" if tries else "")
            tries += 1
            if isinstance(result, Capture):
                return result
            error = result
        assert error is not None  # (the last attempt is dynamo's default trace, always made)
        _fall_back(error, model, options, names, opaque, failures)
    raise ExtractionError("gave up after making 64 modules opaque")  # pragma: no cover


def _attempts(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[Tuple[bool, bool]]:
    """(size-oblivious, example sizes of 1 specialized) for each trace to try, in order."""
    if not _compat.SIZE_OBLIVIOUS:
        return [(False, False)]
    ones = any(isinstance(x, torch.Tensor) and 1 in x.shape for x in _compat.tree_leaves((args, kwargs)))
    return [(True, False)] + ([(True, True)] if ones else []) + [(False, False)]


def _trace(model: torch.nn.Module, root: _CaptureRoot, args: Tuple[Any, ...], kwargs: Dict[str, Any],
           opaque: Set[int], failures: Dict[str, str], *, hooked: bool, on_meta: bool,
           size_oblivious: bool = False, ones_static: bool = False, label: str = "") -> Union[Capture, BaseException]:
    """One attempt: the eager recording, then one dynamo trace with the markers; the capture,
    or why dynamo failed. ``label`` ends its progress phases' names."""
    progress.phase("eager recording" + label)
    with Recorder(model, frozenset(opaque)) as recorder:
        # each pass gets its own copy of a key/value cache: the model grows it in place
        eager_args, eager_kwargs = kv_cache.copy_caches((args, kwargs))
        with torch.no_grad(), _compat.pretend_compiling():
            model(*eager_args, **eager_kwargs)
        calls = list(recorder.calls)
        recorder.prepare_opaque()
        recorder.reset_calls()
        recorder.calls.extend(calls)  # keep the eager records for the opaque outputs
        progress.phase("dynamo trace" + label, recorder.traced_calls())
        recorder.tracing = True
        recorder.inject_cache = on_meta
        captured: List[Any] = []

        def backend(gm: torch.fx.GraphModule, example_inputs: List[Any]) -> Callable[..., Any]:
            captured.append((gm, list(example_inputs)))

            def stop(*_: Any, **__: Any) -> Any:
                raise _StopAfterCapture()

            return stop

        _compat.reset_dynamo()
        compiled = torch.compile(root, backend=backend, fullgraph=True, dynamic=True)
        error: Optional[BaseException] = None
        try:
            with torch.enable_grad(), warnings.catch_warnings(), (
                _meta_view(model) if hooked else contextlib.nullcontext()
            ):
                warnings.simplefilter("ignore")
                tensor_names = _tensor_names(model)
                if hooked:
                    meta_args, meta_kwargs = kv_cache.copy_caches((args, kwargs), lambda t: t.to("meta"))
                    call = (_to_meta(meta_args), _to_meta(meta_kwargs))
                else:
                    call = kv_cache.copy_caches((args, kwargs))
                static = [x for x in _compat.tree_leaves(call) if isinstance(x, torch.Tensor)] if ones_static else []
                with _compat.dynamo_capture_config(size_oblivious, static):
                    compiled(*call)
        except _StopAfterCapture:
            pass
        except Exception as exc:  # dynamo raises many exception types
            error = exc
        finally:
            _compat.reset_dynamo()
        if error is not None:
            return error
        if len(captured) != 1:
            return ExtractionError(f"dynamo produced {len(captured)} graphs instead of one")
        gm, example_inputs = captured[0]
        inline_autograd_functions(gm)
        fakes = [_compat.fake_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
        facts = _compat.shape_facts(fakes) if size_oblivious else None
        return Capture(gm.graph, example_inputs, recorder, opaque, failures, tensor_names, shape_facts=facts)


def _fall_back(error: BaseException, model: torch.nn.Module, options: ExtractionOptions, names: Dict[int, str],
               opaque: Set[int], failures: Dict[str, str]) -> None:
    """Make the modules dynamo failed in opaque (added to ``opaque`` and ``failures``), or
    raise where the options forbid it or no module is to blame."""
    culprits = _culprit_modules(error, model, opaque)
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if options.error_on_compilation_failure or not culprits:
        where = names.get(id(culprits[0]), "") if culprits else ""
        raise ExtractionError(
            f"dynamo could not capture {type(model).__name__}"
            + (f" (in module {where!r})" if where else "")
            + f": {reason}",
            module_path=where,
            hint="pass ExtractionOptions(classes_to_skip_compiling=(TheClass,)) to keep that module "
            "opaque, or unset error_on_compilation_failure to fall back automatically",
        ) from error
    for module in culprits:
        opaque.add(id(module))
        failures[names.get(id(module), "?")] = reason
        if options.warn_on_compilation_failure:
            warnings.warn(
                f"graphpatch_cache: module {names.get(id(module), '?')!r} "
                f"({type(module).__name__}) could not be compiled and stays opaque: {reason}",
                stacklevel=4,  # the caller of extract (capture <- extract <- caller)
            )


__all__ = ["Capture", "capture"]
