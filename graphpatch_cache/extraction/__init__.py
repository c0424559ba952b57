"""Extraction: model + example inputs -> :class:`~graphpatch_cache.artifact.GraphArtifact`.

Call map::

    extract(model, args, kwargs, options)     (or inputs=CallInputs, canonicalized by the caller)
      -> live.inputs.CallInputs.of         positional -> keyword, as forward() binds them
      -> capture.capture                    eager recording + one dynamo trace with markers
      -> split.split                        one fx graph per module call
      -> serialize.frame_to_data            pure data, call targets as allowlisted names
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, cast

import torch

from .. import _compat, progress
from ..trust import validate
from ..artifact import SCHEMA_VERSION, GraphArtifact, ModuleGraph
from ..errors import ExtractionError, GraphPatchCacheError, SerializationError, UnusedSubmoduleError
from ..live import environment as live_environment
from ..live.inputs import CallInputs
from ..live.sources import module_file_digest, module_name_for_file
from ..live.structure import structure
from ..options import ON_DEMAND, ExtractionOptions
from . import on_demand
from .capture import capture
from .serialize import frame_to_data
from .sizes import Served, served_dims
from .split import Frame, split
from ..artifact.names import qualname, join_path

_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.ParameterList, torch.nn.ParameterDict)


def environment_versions() -> Dict[str, str]:
    """Versions that determine what a trace produces (those installed), as artifacts record
    them."""
    return {name: v for name, v in live_environment.environment_versions().items() if v is not None}


def _read_tensors(cap: Any) -> Set[str]:
    """Qualified names of the parameters and buffers the traced graph reads (placeholders
    with users): a module whose weight the model reads without calling the module
    (DeBERTa-v2's ``encoder.rel_embeddings.weight``) is used."""
    placeholders = [n for n in cap.graph.nodes if n.op == "placeholder"]
    return {name for node, value in zip(placeholders, cap.example_inputs) if node.users
            for name in cap.tensor_names.get(id(value), ())}


def _check_unused(model: torch.nn.Module, called: Set[int], read: Set[str], options: ExtractionOptions) -> None:
    """Raise for never-called submodules that own parameters, none of which the graph reads.
    Parameterless ones (a dropout that sdpa attention bypasses) have nothing to patch or bind
    and are always allowed."""
    if options.allow_unused_submodules:
        return
    used_tensors = {
        id(p)
        for m in model.modules()
        if id(m) in called
        for p in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    }
    unused = [
        name
        for name, module in model.named_modules()
        if name
        and id(module) not in called
        and not isinstance(module, _CONTAINERS)
        and any(True for _ in module.parameters())
        and not any(id(m) in called for m in module.modules())
        # a module whose parameters are all tied to called modules' (T5's `shared`) is used
        and not all(id(p) in used_tensors for p in module.parameters())
        and not any(join_path(name, t) in read for t, _ in module.named_parameters())
    ]
    if unused:
        shown = ", ".join(unused[:10]) + (f" and {len(unused) - 10} more" if len(unused) > 10 else "")
        raise UnusedSubmoduleError(
            f"submodules never called with these example inputs: {shown}",
            module_path=unused[0],
            hint="pass ExtractionOptions(allow_unused_submodules=True), or example inputs that use them",
        )


def _dynamic_dims(root: Frame, inputs: CallInputs, facts: Any) -> List[Optional[List[Served]]]:
    """Per tensor input, what each dimension serves (:func:`.sizes.served_dims`)."""
    fakes = [n.meta.get("example_value") for n in root.graph.nodes if n.op == "placeholder"][: _count_tensors(inputs)]
    shapes = [tuple(x.shape) for x in inputs.leaves if isinstance(x, torch.Tensor)]
    return served_dims(fakes, shapes, facts)


def _count_tensors(inputs: CallInputs) -> int:
    return sum(isinstance(x, torch.Tensor) for x in inputs.leaves)


def _reroot(graph: ModuleGraph, prefix: str, name: str, signature: Dict[str, Any]) -> ModuleGraph:
    """A sub-extraction's root graph, renamed and re-pathed to sit inside the full model."""

    def fix(g: ModuleGraph, top: bool) -> ModuleGraph:
        path = prefix if not g.module_path else (f"{prefix}.{g.module_path}" if prefix else g.module_path)
        attrs = {k: join_path(prefix, v) for k, v in g.attributes.items()}
        return dataclasses.replace(
            g,
            name=name if top else g.name,
            module_path=path,
            attributes=attrs,
            children=[fix(c, False) for c in g.children],
            call_signature=signature if top else g.call_signature,
        )

    return fix(graph, True)


def _with_opaque_children(model: torch.nn.Module, root: Frame, data: ModuleGraph, options: ExtractionOptions,
                          specialized: Dict[str, str]) -> ModuleGraph:
    """Extract the calls an opaque module makes to its children, each on its own, and attach
    them as the opaque graph's children (so they compile even though their parent cannot).
    The size-specialized graphs among them are added to ``specialized`` (by module path)."""
    frames: Dict[str, Frame] = {}

    def index(frame: Frame, path: str) -> None:
        frames[path] = frame
        for child in frame.children:
            index(child, f"{path}.{child.local_name}" if path else child.local_name)

    index(root, "")
    todo = sum(len(f.opaque_calls) for f in frames.values() if f.record is not None and f.opaque_calls)
    if todo:
        progress.phase("opaque children", todo)

    def visit(g: ModuleGraph, path: str) -> ModuleGraph:
        frame = frames.get(path)
        if g.kind != "opaque" or frame is None or frame.record is None:
            return dataclasses.replace(g, children=[visit(c, f"{path}.{c.name}" if path else c.name) for c in g.children])
        children = []
        for child_record, local, child_path in frame.opaque_calls:
            progress.step()
            if child_record.inputs is None:
                continue
            try:
                with progress.muted():  # counted here, as one step of this extraction
                    sub = extract(child_record.module, child_record.inputs[0], child_record.inputs[1],
                                  dataclasses.replace(options, allow_unused_submodules=True))
            except (GraphPatchCacheError, TypeError) as exc:
                # The call cannot be extracted on its own (it reads state its parent passes
                # in objects we cannot store): it runs inside its opaque parent, unpatchable.
                if options.error_on_compilation_failure:
                    raise
                if options.warn_on_compilation_failure:
                    warnings.warn(f"graphpatch_cache: {child_path!r} runs inside its opaque parent: {exc}", stacklevel=2)
                continue
            for where, why in sub.extraction.get("shape_specialized", {}).items():
                specialized[f"{child_path}.{where}" if where else child_path] = why
            children.append(_reroot(sub.root, child_path, local, sub.signature))
        return dataclasses.replace(g, children=children)

    return visit(data, "")


_FILE_RE = re.compile(r'File "([^"]+)", line')


def traced_sources(graph: torch.fx.Graph) -> Dict[str, str]:
    """``{module name: sha256 of its file}`` for every Python module dynamo traced code from
    (the model's own files, and helpers they call in other files), except torch and this
    package (their versions are in the key). A cache hit re-checks them, so editing any
    traced file makes the old graph a miss."""
    paths = set()
    for node in graph.nodes:
        paths.update(_FILE_RE.findall(node.meta.get("stack_trace") or ""))
    out: Dict[str, str] = {}
    for path in sorted(paths):
        name = module_name_for_file(path)
        if name is None or name == "torch" or name.startswith(("torch.", "graphpatch_cache")):
            continue
        digest = module_file_digest(path)
        if digest is not None:
            out[name] = digest
    return out


def _trace(model: torch.nn.Module, inputs: CallInputs,
           options: ExtractionOptions) -> Tuple[Any, Frame, ModuleGraph, Dict[str, str]]:
    """(the capture, the root frame, its graphs as data, the modules made opaque and why):
    traced again with more modules opaque until every graph serializes."""
    opaque: Set[int] = set()
    failures: Dict[str, str] = {}
    while True:
        cap = capture(model, inputs.args, inputs.kwargs, options, opaque, failures)
        _check_unused(model, {id(c.module) for c in cap.recorder.calls}, _read_tensors(cap), options)
        # split reads the mapping only (ExtractionOptions types it as a Mapping)
        root = split(model, cap, cast(Dict[type, Callable[..., Any]], options.custom_extraction_functions))
        progress.phase("serialization")
        try:
            data = frame_to_data(root)
            break
        except SerializationError as exc:
            module = getattr(exc, "module", None)
            if module is None or id(module) in cap.opaque or options.error_on_compilation_failure:
                raise
            # every module of that class would fail the same way: make them opaque at once
            opaque = set(cap.opaque) | {id(m) for m in model.modules() if type(m) is type(module)}
            failures = dict(cap.failures)
            failures[getattr(exc, "module_path", "?")] = exc.message.splitlines()[0]
            if options.warn_on_compilation_failure:
                warnings.warn(
                    f"graphpatch_cache: module {getattr(exc, 'module_path', '?')!r} stays opaque: {exc.message}",
                    stacklevel=3,
                )
    if root.hidden:
        raise ExtractionError(
            f"{type(model).__name__} reads values that are neither its inputs nor its parameters or "
            f"buffers: {[n.name for n in root.hidden]}",
            hint="register such tensors as buffers, or pass them as inputs",
        )
    return cap, root, data, failures


def extract(
    model: torch.nn.Module,
    args: Tuple[Any, ...] = (),
    kwargs: Optional[Dict[str, Any]] = None,
    options: Optional[ExtractionOptions] = None,
    *,
    inputs: Optional[CallInputs] = None,
) -> GraphArtifact:
    """Trace ``model(*args, **kwargs)`` and return its graphs as a :class:`GraphArtifact`.

    :param inputs: the call's :class:`~graphpatch_cache.live.inputs.CallInputs`, when the
        caller has canonicalized them already (then ``args``/``kwargs`` are not read).

    :raises ExtractionError: tracing failed and ``error_on_compilation_failure`` is set.
    :raises UnusedSubmoduleError: a submodule was never called (see ``allow_unused_submodules``).
    :raises SerializationError: a graph calls something that cannot be stored as data.
    """
    options = options or ExtractionOptions()
    name = progress.title(type(model).__name__, ON_DEMAND.get() is not None)
    with on_demand.announced(options) as outermost, progress.task(name, options.progress):
        artifact = _extract(model, args, kwargs, options, inputs)
    if outermost:
        on_demand.report_opaque(artifact.extraction.get("opaque") or {}, options)
    return artifact


def _extract(model: torch.nn.Module, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]],
             options: ExtractionOptions, inputs: Optional[CallInputs]) -> GraphArtifact:
    if inputs is None:
        progress.phase("canonical inputs")
        inputs = CallInputs.of(model, args, kwargs)
    cap, root, data, failures = _trace(model, inputs, options)
    paths = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    specialized = {paths.get(id(cap.recorder.calls[i].module), "?"): why for i, why in cap.recorder.specialized.items()}
    if cap.recorder.window_fixed is not None:  # (a key/value cache's sliding window)
        specialized[""] = cap.recorder.window_fixed
    data = _with_opaque_children(model, root, data, options, specialized)
    # An opaque call's outputs come from its forward run on symbolic fakes, so the graphs
    # around it stay shape-generic. Where that failed (data-dependent code), or a call takes
    # sizes as Python ints, they are known only at the example's sizes, and so are the graphs
    # that use them (and a child graph's signature is checked by its opaque parent's router,
    # which cannot extract anew): then every size is fixed, and other sizes get their own
    # (on-demand) variant.
    progress.phase("sources and validation")
    dims = None if cap.generic else _dynamic_dims(root, inputs, cap.shape_facts)
    if specialized:
        dims = [[False] * x.dim() for x in inputs.leaves if isinstance(x, torch.Tensor)]
    signature = inputs.signature(dims)
    devices = sorted({str(p.device) for p in list(model.parameters()) + list(model.buffers())})
    artifact = GraphArtifact(
        schema_version=SCHEMA_VERSION,
        model_class=qualname(type(model)),
        root=data,
        signature=signature,
        input_spec=_compat.treespec_dumps(inputs.spec),
        extraction={
            "options": options.fingerprint(),
            "devices": devices,
            "training": bool(model.training),
            "opaque": dict(sorted(failures.items() | cap.failures.items())),
            # module path -> why the graphs are fixed to the example's sizes (see above)
            "shape_specialized": dict(sorted(specialized.items())),
            # module path -> how an opaque call's output sizes needed the example's data
            "data_dependent": dict(sorted(
                (paths.get(id(cap.recorder.calls[i].module), "?"), why) for i, why in cap.recorder.data_dependent.items())),
            "structure": structure(model),
            "sources": traced_sources(cap.graph),
        },
        versions=environment_versions(),
    )
    # what we store must pass the loader's checks (a refusal here is a bug of ours, loud)
    validate.check_artifact(artifact)
    return artifact


__all__ = ["environment_versions", "extract"]
