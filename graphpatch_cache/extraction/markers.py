"""Module-call markers: how one flat dynamo graph keeps the model's module hierarchy.

During extraction every module gets a forward pre-hook and a forward hook. In an ordinary
(eager) call they *record* the call: which module, its inputs' structure and names, its
output's structure. While dynamo traces they instead route the call's tensors through two
marker operators, ``graphpatch_cache::enter`` and ``graphpatch_cache::exit``, so the flat
graph shows exactly where each module call starts and ends and which values cross the
boundary. :mod:`.split` turns the markers back into one graph per module call and removes
them; they never reach an artifact or run at patch time.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree

from .. import _compat
from ..integrations import kv_cache

_LIB = torch.library.Library("graphpatch_cache", "DEF")
_LIB.define("enter(str tag, Tensor[] xs) -> Tensor[]")
_LIB.define("exit(str tag, Tensor[] xs) -> Tensor[]")
# ``ints``: the symbolic Python ints (sizes) the opaque call is given; they cannot reach the
# stored call, so their presence makes the graphs around it size-specialized
_LIB.define("opaque(str tag, Tensor[] xs, SymInt[] ints) -> Tensor[]")


def _clone_all(tag: str, xs: List[torch.Tensor]) -> List[torch.Tensor]:
    return [x.clone() for x in xs]


def _empty_like_all(tag: str, xs: List[torch.Tensor]) -> List[torch.Tensor]:
    return [torch.empty_like(x) for x in xs]


for _name in ("enter", "exit"):
    _LIB.impl(_name, _clone_all, "CompositeExplicitAutograd")
    torch.library.register_fake(f"graphpatch_cache::{_name}", _empty_like_all, lib=_LIB)

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
    return _ACTIVE[-1].opaque_outputs(tag, xs, ints)


_LIB.impl("opaque", _opaque_eager, "CompositeExplicitAutograd")
torch.library.register_fake("graphpatch_cache::opaque", _opaque_fake, lib=_LIB)


@dataclass
class TensorMeta:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    stride: Tuple[int, ...]


@dataclass
class CallRecord:
    """One eager call of one module, as seen by the hooks."""

    index: int
    tag: str
    module: torch.nn.Module
    parent: Optional[int]
    input_spec: Any = None
    input_names: List[str] = field(default_factory=list)  # one per leaf
    input_locations: List[List[Any]] = field(default_factory=list)  # one per leaf (leaf_locations)
    input_leaves: List[Any] = field(default_factory=list)  # non-tensor leaves; None for tensors
    input_is_tensor: List[bool] = field(default_factory=list)
    output_spec: Any = None
    output_leaves: List[Any] = field(default_factory=list)
    output_is_tensor: List[bool] = field(default_factory=list)
    output_meta: List[Optional[TensorMeta]] = field(default_factory=list)
    children: List[int] = field(default_factory=list)
    #: whether the output holds a key/value cache object
    returns_cache: bool = False
    #: the actual (args, kwargs), kept only for calls made by an opaque module (they are
    #: extracted separately, so that an opaque module's children still compile) and for an
    #: opaque module's own calls (their real values answer data questions of the fake run)
    inputs: Optional[Tuple[tuple, dict]] = None


def _key_str(key: Any) -> str:
    for attr in ("idx", "key", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_names(forward: Any, args: tuple, kwargs: dict) -> List[str]:
    """A readable name for each pytree leaf of ``(args, kwargs)``: the forward's parameter
    name, then the path inside nested containers (``past_0_1``)."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), "args")
    names = []
    for path, _ in pytree.tree_flatten_with_path((args, kwargs))[0]:
        parts = [_key_str(k) for k in path]
        if parts[0] == "0":
            i = int(parts[1])
            head = positional[i] if i < len(positional) else f"{var_pos}_{i - len(positional)}"
        else:
            head = parts[1]
        names.append("_".join([head] + parts[2:]))
    return names


def leaf_locations(forward: Any, args: tuple, kwargs: dict) -> List[List[Any]]:
    """Where each pytree leaf of ``(args, kwargs)`` sits in the forward's signature:
    ``[parameter name, key, ...]``, with an int per sequence index and a str per mapping key or
    attribute. Leaves of ``*foos`` are ``["foos", i]`` and of ``**bars`` ``["bars", key]``, as
    graphpatch names them (``foos|sub_0``, ``bars|a``); the runtime offers these as aliases of
    the placeholders, whose names (``foos``, ``a``) :func:`leaf_names` gives."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_pos = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    var_kw = next((p.name for p in params if p.kind == p.VAR_KEYWORD), None)
    out: List[List[Any]] = []
    for path, _ in pytree.tree_flatten_with_path((args, kwargs))[0]:
        keys: List[Any] = [k.idx if hasattr(k, "idx") else _key_str(k) for k in path]
        if keys[0] == 0:
            i = int(keys[1])
            if i < len(positional):
                head: List[Any] = [positional[i]]
            elif var_pos is not None:
                head = [var_pos, i - len(positional)]
            else:
                head = ["args", i]
        else:
            name = str(keys[1])
            head = [var_kw, name] if var_kw is not None and name not in named else [name]
        out.append(head + keys[2:])
    return out


def _plain(value: Any) -> bool:
    """Only tensors, non-containers and plain tuple/list/dict nests (no ModelOutput)."""
    if type(value) in (tuple, list):
        for i in range(len(value)):
            if not _plain(value[i]):
                return False
        return True
    if type(value) is dict:
        for key in value:
            if not _plain(value[key]):
                return False
        return True
    return not isinstance(value, (tuple, list, dict))


def _collect(value: Any, out: List[Any]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif type(value) in (tuple, list):
        for i in range(len(value)):
            _collect(value[i], out)
    elif type(value) is dict:
        for key in value:
            _collect(value[key], out)


def _rebuild(value: Any, new: List[Any], pos: List[int]) -> Any:
    if isinstance(value, torch.Tensor):
        pos[0] += 1
        return new[pos[0] - 1]
    if type(value) is tuple:
        return tuple([_rebuild(value[i], new, pos) for i in range(len(value))])
    if type(value) is list:
        return [_rebuild(value[i], new, pos) for i in range(len(value))]
    if type(value) is dict:
        return {key: _rebuild(value[key], new, pos) for key in value}
    return value


def _route_caches(marker: Any, tag: str, value: Any, cls: Any) -> Any:
    """:func:`_route` for a value holding key/value cache objects: the caches' tensors go
    through ``marker`` in the order of :func:`kv_cache.as_states` and the marker's outputs are
    written back into the same cache objects (the model mutates them in place, so the objects
    must stay the same)."""
    leaves, spec = pytree.tree_flatten(value)
    flat: List[Any] = []
    for i in range(len(leaves)):
        if isinstance(leaves[i], torch.Tensor):
            flat.append(leaves[i])
        elif isinstance(leaves[i], cls):
            for layer in leaves[i].layers:
                if layer.is_initialized:
                    flat.append(layer.keys)
                    flat.append(layer.values)
    new = marker(tag, flat)
    j = 0
    for i in range(len(leaves)):
        if isinstance(leaves[i], torch.Tensor):
            leaves[i] = new[j]
            j += 1
        elif isinstance(leaves[i], cls):
            for layer in leaves[i].layers:
                if layer.is_initialized:
                    layer.keys = new[j]
                    layer.values = new[j + 1]
                    j += 2
    return pytree.tree_unflatten(leaves, spec)


def _holds(cls: Any, value: Any) -> bool:
    """Whether an instance of ``cls`` is inside tuple/list/dict nests (ModelOutput included)
    of ``value``; walked by index, binding no tensor to a local (see :func:`_route`)."""
    if isinstance(value, (tuple, list)):
        for i in range(len(value)):
            if _holds(cls, value[i]):
                return True
        return False
    if isinstance(value, dict):
        for key in value:
            if _holds(cls, value[key]):
                return True
        return False
    return isinstance(value, cls)


def _route(marker: Any, tag: str, value: Any, caches: Any = None) -> Any:
    """Pass the tensor leaves of ``value`` through ``marker`` (while dynamo traces).

    No tensor is ever bound to a local variable here: dynamo names a node after the first
    variable it is stored in, and the nodes should keep the names the module's own code
    gives them (``mul_3``, ``attn_output``). Plain tuple/list/dict nests are walked by index
    for that reason (and because tracing pytree costs dynamo much more); anything else
    (``ModelOutput``) goes through pytree. Leaf order is pytree's in both cases. With
    ``caches`` (transformers' Cache class), key/value cache objects are routed too (see
    :func:`_route_caches`).
    """
    if caches is not None and _holds(caches, value):
        return _route_caches(marker, tag, value, caches)
    if isinstance(value, torch.Tensor):
        return marker(tag, [value])[0]
    if _plain(value):
        leaves: List[Any] = []
        _collect(value, leaves)
        return _rebuild(value, marker(tag, leaves), [0])
    leaves, spec = pytree.tree_flatten(value)
    idx = [i for i in range(len(leaves)) if isinstance(leaves[i], torch.Tensor)]
    new = marker(tag, [leaves[i] for i in idx])
    for j in range(len(idx)):
        leaves[idx[j]] = new[j]
    return pytree.tree_unflatten(leaves, spec)


def _hint(size: Any) -> Optional[int]:
    """A size's value at the example (None for a data-dependent size)."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return None if hint is None else int(hint)
    return int(size)


@contextlib.contextmanager
def _quiet_real_tensor_log() -> Any:
    """The symbolic-shapes logger warns for each data question real tensors answer."""
    import logging

    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _module_state(module: torch.nn.Module) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Shallow copies of every submodule's attribute tables (``__dict__``, parameters,
    buffers, children): a forward run on fake tensors may cache values on its module
    (``self.cached = mask``), which must not outlive the run (nor the hook tables it swaps
    out, see fake_forward)."""
    state = []
    for m in module.modules():
        for table in (m.__dict__, m._parameters, m._buffers, m._modules):
            state.append((table, dict(table)))
    return state


def _restore_module_state(state: List[Tuple[Dict[str, Any], Dict[str, Any]]]) -> None:
    for table, saved in state:
        if len(table) != len(saved) or any(table.get(k, _MISSING) is not v for k, v in saved.items()):
            table.clear()
            table.update(saved)


class Recorder:
    """Installs the marker hooks on every module of ``model`` for the duration of a ``with``.

    :ivar calls: the eager calls recorded, in call order.
    """

    def __init__(self, model: torch.nn.Module, opaque_modules: frozenset = frozenset()) -> None:
        self.model = model
        self.tags: Dict[int, str] = {}
        self.modules_by_tag: Dict[str, torch.nn.Module] = {}
        self.calls: List[CallRecord] = []
        self._stack: List[int] = []
        self._handles: List[Any] = []
        self.opaque_modules = opaque_modules  # ids of modules traced as one opaque call
        self._opaque_counts: Dict[str, int] = {}
        self._saved_forwards: Dict[int, Any] = {}
        self.tracing = False  # False: record eager calls; True: emit markers for dynamo
        self.cache_class = kv_cache.cache_class()  # key/value caches are routed as tensors
        #: the cache the model's own call created (its layers' key/value dtypes), when it was
        #: called without one; with ``inject_cache`` the trace hands the model an equal one
        #: (see :func:`kv_cache.empty_cache`)
        self.created_cache: Optional[List[Any]] = None
        self.inject_cache = False
        #: whether the eager recording saw a cache object at all (else the trace skips the
        #: search for caches in every call's inputs and outputs)
        self.saw_cache = False
        #: > 0 while an opaque module's forward runs on fake tensors (see fake_forward): the
        #: wrapped forwards then only call through, recording and marking nothing
        self.faking = 0
        #: index of each opaque call whose fake outputs had to take the eager call's concrete
        #: sizes -> why (the graphs around it are then specialized to the example's sizes)
        self.specialized: Dict[int, str] = {}
        #: index of each opaque call whose run on fakes needed the example's data -> why
        self.data_dependent: Dict[int, str] = {}

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
                self.tags[id(module)] = tag
                self.modules_by_tag[tag] = module
                self._saved_forwards[id(module)] = module.__dict__.get("forward", _MISSING)
                module.forward = self._wrapped_forward(tag, module, module.forward)  # type: ignore[method-assign]
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
    def _wrapped_forward(self, tag: str, module: torch.nn.Module, forward: Any):
        recorder = self

        from ..integrations.bitsandbytes import leaf_handler

        handler = leaf_handler(module)
        # accelerate hooks (offloading, device alignment) cannot be traced: dynamo sees the
        # module's own forward, and the runtime runs the hooks around the module's graph
        traced_forward = module.__dict__.get("_old_forward", forward) if hasattr(module, "_hf_hook") else forward

        def forward_with_markers(*args: Any, **kwargs: Any) -> Any:
            if recorder.faking:
                if handler is not None:
                    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
                    return handler.fake_outputs(module, leaves)[0]
                return traced_forward(*args, **kwargs)
            if not recorder.tracing:
                recorder._record_enter(tag, module, args, kwargs, forward)
                if handler is not None:
                    # leaf modules are never traced: the recording needs only their output's
                    # shape (and a quantized layer cannot run on the meta device)
                    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
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

    def _with_cache(self, forward: Any, args: tuple, kwargs: dict) -> dict:
        name = kv_cache.cache_argument(forward)
        if name is None or kwargs.get(name) is not None:
            return kwargs
        # only models traced on the meta device get one (see capture)
        return dict(kwargs, **{name: kv_cache.empty_cache(self.created_cache, torch.device("meta"))})

    # -- opaque modules ---------------------------------------------------------------------
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

    def _opaque_call(self, tag: str, args: tuple, kwargs: dict) -> Any:
        spec, template, is_tensor = self._opaque_templates[tag]
        leaves, _ = pytree.tree_flatten((args, kwargs))
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
        return pytree.tree_unflatten(out_leaves, spec)

    def _opaque_record(self, tag: str) -> CallRecord:
        k = self._opaque_counts.get(tag, 0)
        matches = [c for c in self.calls if c.tag == tag]
        self._opaque_counts[tag] = k + 1
        return matches[min(k, len(matches) - 1)]

    def opaque_outputs(self, tag: str, xs: List[torch.Tensor], ints: Sequence[Any] = ()) -> List[torch.Tensor]:
        """Fake outputs for the k-th traced call of an opaque module.

        From its leaf handler where it has one; else from running the module's forward on the
        fake (symbolic) inputs, so the graphs around it stay shape-generic; else (the forward
        reads data, or the call takes sizes as Python ints) empty tensors with the metadata of
        the k-th eager call, and the call is listed in :attr:`specialized`.
        """
        from ..integrations.bitsandbytes import leaf_handler

        record = self._opaque_record(tag)
        handler = leaf_handler(record.module)
        if handler is not None:
            return handler.fake_outputs(record.module, list(xs))
        if any(isinstance(n, torch.SymInt) and not getattr(n.node.expr, "is_number", False) for n in ints):
            return self._eager_outputs(record, "takes sizes as Python ints, which the stored call holds as constants")
        if record.returns_cache or any(kv_cache.is_cache(x) or isinstance(x, kv_cache.CacheState)
                                       for x in record.input_leaves):
            # (split refuses such a call: an opaque call cannot pass a key/value cache object)
            return self._eager_outputs(record, "takes or returns a key/value cache")
        if any(type(x) in (int, float) for x in record.output_leaves):
            return self._eager_outputs(record, "returns Python numbers, which the graphs around it hold as constants")
        try:
            return self.fake_forward(record, list(xs))
        except Exception as exc:  # any failure of the fake run: data-dependent code, unsupported ops...
            error = exc
        real = self._real_inputs(record, len(xs))
        if real is not None:
            # A branch on data (`if h.sum() > 0`) cannot be decided on fakes: run again with
            # the example call's real values alongside (fake tensors' real-tensor
            # propagation), so data questions get the example's answer and sizes stay symbolic.
            try:
                outs = self.fake_forward(record, list(xs), real_inputs=real)
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

    def _real_inputs(self, record: CallRecord, count: int) -> Optional[List[torch.Tensor]]:
        if record.inputs is None:
            return None
        real = [x for x in pytree.tree_leaves(record.inputs) if isinstance(x, torch.Tensor)]
        return real if len(real) == count else None

    def _eager_outputs(self, record: CallRecord, why: str) -> List[torch.Tensor]:
        self.specialized[record.index] = why
        return [
            torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=m.device)
            for m in record.output_meta
            if m is not None
        ]

    def fake_forward(self, record: CallRecord, xs: List[torch.Tensor], fake_mode: Any = None,
                     real_inputs: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """The tensor outputs of ``record``'s module called on fake inputs ``xs`` (in the order
        of its tensor input leaves) and the recorded non-tensor inputs, with its parameters and
        buffers as fakes of the active fake mode. Children's wrapped forwards only call through
        while it runs, and everything the forward may change on the modules is put back. With
        ``real_inputs`` (the example call's tensors, one per fake), questions about data are
        answered from real values computed alongside.

        :raises ValueError: the outputs do not match the eager call's (count, dtype, or sizes
            at the example's values).
        """
        from torch._guards import detect_fake_mode

        mode = fake_mode or detect_fake_mode(xs) or detect_fake_mode()
        if mode is None:
            raise RuntimeError("no fake tensor mode is active")
        module = record.module
        it = iter(xs)
        leaves = [next(it) if t else c for c, t in zip(record.input_leaves, record.input_is_tensor)]
        args, kwargs = pytree.tree_unflatten(leaves, record.input_spec)
        tensors = {}
        reals: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (fake, real) pairs to attach
        for name, value in list(module.named_parameters(remove_duplicate=False)) + list(
                module.named_buffers(remove_duplicate=False)):
            tensors[name] = mode.from_tensor(value, static_shapes=True)
            reals.append((tensors[name], value))
        if real_inputs is not None:
            reals.extend(zip(xs, real_inputs))
        saved = _module_state(module)
        self.faking += 1
        # fake tensor's dispatch cache costs more than it saves on a one-off run with symbolic
        # sizes (a tiny GPT-2 on fakes: 3.5 s with it, 1.7 s without)
        settings = {"cache_enabled": False, "propagate_real_tensors": real_inputs is not None}
        previous = {k: getattr(mode, k) for k in settings if hasattr(mode, k)}
        attached = [(fake, getattr(fake, "real_tensor", None)) for fake, _ in reals] if real_inputs is not None else []
        shape_env = getattr(mode, "shape_env", None)
        try:
            for k in previous:
                setattr(mode, k, settings[k])
            if real_inputs is not None:
                for fake, real in reals:
                    fake.real_tensor = real
            # symbols the run makes for data (`u0`) are ours, not outputs of the traced op
            ignore = shape_env.ignore_fresh_unbacked_symbols() if hasattr(
                shape_env, "ignore_fresh_unbacked_symbols") else contextlib.nullcontext()
            # Forward hooks stay out of the run: transformers' output recorders would add the
            # fakes to the hidden states being collected by the trace around it.
            for m in module.modules():
                m._forward_hooks = collections.OrderedDict()
                m._forward_pre_hooks = collections.OrderedDict()
            with mode, _compat.not_compiling(), ignore, _quiet_real_tensor_log():
                out = torch.func.functional_call(module, tensors, tuple(args), dict(kwargs), strict=False)
        finally:
            for fake, old in attached:
                fake.real_tensor = old
            for k, v in previous.items():
                setattr(mode, k, v)
            self.faking -= 1
            _restore_module_state(saved)
        outs = [x for x in pytree.tree_leaves(kv_cache.as_states(out)) if isinstance(x, torch.Tensor)]
        metas = [m for m in record.output_meta if m is not None]
        if len(outs) != len(metas):
            raise ValueError(f"{len(outs)} tensor outputs on fake inputs, {len(metas)} in the example call")
        for fake, meta in zip(outs, metas):
            hints = [_hint(s) for s in fake.shape]
            if fake.dtype != meta.dtype or tuple(hints) != tuple(meta.shape):
                raise ValueError(f"an output of {fake.dtype} {tuple(hints)} on fake inputs, "
                                 f"{meta.dtype} {tuple(meta.shape)} in the example call")
            if real_inputs is not None and hasattr(fake, "real_tensor"):
                fake.real_tensor = None  # (dynamo's mode does not propagate; keep nothing alive)
        return outs

    def _record_enter(self, tag: str, module: torch.nn.Module, args: tuple, kwargs: dict, forward: Any) -> None:
        originals = (args, kwargs)
        if module is self.model:  # the model's own call takes a cache's tensors (see _route)
            states = kv_cache.as_states(originals)
            self.saw_cache = self.saw_cache or states is not originals
            args, kwargs = states
        leaves, spec = pytree.tree_flatten((args, kwargs))
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
            given = [x for x in record.input_leaves if isinstance(x, (self.cache_class, kv_cache.CacheState))]
            if not given:
                self.created_cache = [
                    (layer.keys.dtype, layer.values.dtype) if getattr(layer, "is_initialized", False) else None
                    for layer in made[0].layers
                ]
        leaves, spec = pytree.tree_flatten(kv_cache.as_states(output))
        record.output_spec = spec
        record.output_leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        record.output_is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        record.output_meta = [
            TensorMeta(tuple(x.shape), x.dtype, x.device, tuple(x.stride())) if isinstance(x, torch.Tensor) else None
            for x in leaves
        ]
