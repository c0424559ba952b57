"""PatchableGraph: the user-facing object. ``bind(extract(model, inputs), model)`` plus patching.

Call map::

    PatchableGraph(model, *inputs)      -> extract -> Variant(bind(artifact, model))
    pg(*args, **kwargs)                 -> canonical inputs -> matching variant (or extract one)
                                           -> root GraphModule(*tensor leaves)
    with pg.patch({path: patches}):     -> resolve and check all -> patch_stack.sync per variant
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import _compat
from ..artifact import GraphArtifact
from ..artifact.signature import SignatureMatcher, signature_key
from ..errors import NotPicklableError, SignatureMismatchError, UnsupportedCacheError
from ..integrations import kv_cache
from ..live.inputs import InputBinder, flat_inputs, mismatch
from ..options import GENERATING, ON_DEMAND, ExtractionOptions
from ..patches import Patch
from . import generate as _generate
from .bind import bind
from .files import FileLike, read_portable_file, write_portable
from .guards import preserved_global_state
from .node_path import NodePath
from .patch_stack import PathResolver, StackEntry, Variant, forget, leave, sync
from .patching import PatchInstaller
from .path_check import PathReport, check_paths
from .path_errors import patched_but_missing
from .recording import NodeSelector, record, select
from ..artifact.names import join_path

#: ``(model, args, kwargs, options) -> GraphArtifact``; the cache plugs in a memoized one.
Extractor = Callable[[torch.nn.Module, Tuple[Any, ...], Dict[str, Any], ExtractionOptions], GraphArtifact]


class PatchableGraph(torch.nn.Module):
    """Wrap ``module`` so any intermediate value can be recorded or replaced by node path.

    ``PatchableGraph(model, *example_args, **example_kwargs)`` extracts the graphs for that
    call; ``PatchableGraph(options, model, ...)`` is not the form: pass an
    :class:`ExtractionOptions` as the *first example argument* instead:
    ``PatchableGraph(model, ExtractionOptions(...), input_ids)``.
    """

    _model: torch.nn.Module  # (set with object.__setattr__: the model is not a submodule)
    _skipped: Tuple[str, ...] = ()  # graphs (paths with a dot) a call may skip: generate_encdec.skipping

    def __init__(self, module: torch.nn.Module, *example_args: Any, **example_kwargs: Any) -> None:
        options, args = _split_options(example_args)
        super().__init__()
        self._setup(module, options, self._default_extractor())
        self._add_variant(self._extract(args, example_kwargs))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def _default_extractor(cls) -> Extractor:
        """The extractor a graph uses when none is given. The runtime never traces: the
        composed class (:class:`graphpatch_cache.compose.PatchableGraph`) supplies
        extraction."""
        raise NotImplementedError(
            "graphpatch_cache.runtime.PatchableGraph binds artifacts only; use graphpatch_cache.PatchableGraph"
        )

    def _setup(self, module: torch.nn.Module, options: ExtractionOptions, extractor: Extractor) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"PatchableGraph wraps a torch.nn.Module, got {type(module).__name__}")
        object.__setattr__(self, "_model", module)
        self._options = options
        self._extractor = extractor
        self._graphs = torch.nn.ModuleDict()
        self._variants: List[Variant] = []
        self._patch_stack: List[Sequence[StackEntry]] = []  # one list per active ``with pg.patch`` block
        self._resolver = PathResolver(self._variants, self._node_paths)
        self._forward_signature = inspect.signature(module.forward)
        self._binder = InputBinder(module, self._forward_signature)  # (a call binds by its form's plan)
        #: copies of a transformers model's ``config`` and ``generation_config`` (graphpatch's
        #: attributes; ``generate`` reads this ``generation_config``), else None
        self.config: Any = None
        self.generation_config: Any = None
        if options.copy_transformers_generation_config:
            self.config, self.generation_config = _generate.copied_generation_config(module)

    @classmethod
    def from_artifact(
        cls,
        module: torch.nn.Module,
        artifact: GraphArtifact,
        *,
        options: Optional[ExtractionOptions] = None,
        extractor: Optional[Extractor] = None,
    ) -> "PatchableGraph":
        """Bind an existing artifact to ``module`` (no extraction)."""
        pg = cls.__new__(cls)
        torch.nn.Module.__init__(pg)
        pg._setup(module, options or ExtractionOptions(), extractor or cls._default_extractor())
        pg._add_variant(artifact)
        return pg

    def _extract(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> GraphArtifact:
        with self._naming_the_model():
            return self._extractor(self._model, tuple(args), dict(kwargs), self._options)

    @contextlib.contextmanager
    def _naming_the_model(self) -> Iterator[None]:
        """Cache errors come from code that does not know the model: name its family."""
        try:
            yield
        except UnsupportedCacheError as exc:
            family = type(self._model).__name__
            if exc.message.startswith(family):
                raise
            raise UnsupportedCacheError(f"{family}: {exc.message}", cache_class=exc.cache_class,
                                        hint=exc.hint) from exc

    def _add_variant(self, artifact: GraphArtifact) -> Variant:
        root = bind(artifact, self._model)
        self._options.run_postprocessing(root, self._model)
        key = signature_key(artifact.signature)
        variant = Variant(artifact, root, SignatureMatcher(artifact.signature), PatchInstaller(root), key)
        self._graphs[f"v_{key}"] = root
        self._variants.append(variant)
        if self._patch_stack:
            sync(self._patch_stack, variant)
        return variant

    # -- public attributes -----------------------------------------------------------------------
    @property
    def graph(self) -> NodePath:
        """The root :class:`NodePath` (of the graphs extracted for the example inputs)."""
        return self._node_paths(self._variants[0])

    @property
    def artifact(self) -> GraphArtifact:
        """The artifact of the example inputs' signature."""
        return self._variants[0].artifact

    @property
    def variants(self) -> List[GraphArtifact]:
        """One artifact per call signature seen so far (the first is the example's)."""
        return [v.artifact for v in self._variants]

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    # -- calling -----------------------------------------------------------------------------------
    def _canonical(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        return self._binder(args, kwargs)

    def _variant_for(self, inputs: Tuple[Tuple[Any, ...], Dict[str, Any]], leaves: List[Any], spec: Any) -> Variant:
        for variant in self._variants:
            if variant.matcher.fits(leaves, spec):
                return variant
        reason = mismatch(self._variants[0].matcher, inputs)
        token = ON_DEMAND.set(None if GENERATING.get() else reason)  # an extraction (not a hit) says so
        try:
            artifact = self._extract(inputs[0], inputs[1])
        except (UnsupportedCacheError, SignatureMismatchError):
            raise
        except Exception as exc:
            raise SignatureMismatchError(
                f"this call does not match the graphs extracted so far ({reason}), and extracting a "
                f"graph for it failed: {exc}",
                hint="call with inputs like the example inputs, or build a PatchableGraph from "
                "example inputs of this form",
            ) from exc
        finally:
            ON_DEMAND.reset(token)
        variant = self._add_variant(artifact)
        if not variant.matcher.fits(leaves, spec):  # pragma: no cover - defensive
            raise SignatureMismatchError(f"extracted a graph for this call, but it does not fit: {reason}")
        return variant

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self._canonical(args, kwargs)
        leaves, spec = _compat.tree_flatten(inputs)
        cache_class = kv_cache.cache_class()
        caches = [x for x in leaves if isinstance(x, cache_class)] if cache_class is not None else []
        if caches:  # graphs take a cache as its tensors
            with self._naming_the_model():
                leaves, spec = flat_inputs(inputs)
        variant = self._variant_for(inputs, leaves, spec)
        variant.installer.settle()
        missing = variant.installer.missing
        if missing and self._skipped:  # (a graph this call's model skips: its patches wait)
            missing = [m for m in missing if not (m[0] + ".").startswith(self._skipped)]
        if missing:
            raise patched_but_missing(join_path(missing[0][0], missing[0][1]))
        with preserved_global_state():  # whatever the graph did to grad mode, autocast, dtype
            output = variant.root(*[x for x in leaves if isinstance(x, torch.Tensor)])
        if variant.returns_cache is False:
            return output
        # The graph returns a cache's tensors; like the model, update the caller's cache
        # object in place (or make a new cache when the call created one).
        restored = kv_cache.restore_caches(output, caches)
        if variant.returns_cache is None:
            variant.returns_cache = restored is not output or bool(caches)
        return restored

    def graph_for(self, *args: Any, **kwargs: Any) -> NodePath:
        """The node tree of the graph that a call with these inputs uses (extracting it if needed)."""
        return self._node_paths(self._call_variant(args, kwargs))

    def _call_variant(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Variant:
        inputs = self._canonical(args, kwargs)
        leaves, spec = flat_inputs(inputs)
        return self._variant_for(inputs, leaves, spec)

    def node_paths(self, nodes: NodeSelector = "*") -> List[str]:
        """The value node paths ``nodes`` selects (as :meth:`record` takes it), in graph order."""
        return list(select(self.graph, nodes))

    def check_paths(self, paths: Sequence[Any], since: Any = None) -> PathReport:
        """Node paths from older code: still here, renamed (``since=``: their graphs), or gone (see path_check)."""
        return check_paths(paths, self, since)

    def record(self, *args: Any, nodes: NodeSelector = "*", **kwargs: Any) -> Tuple[Any, Dict[str, Any]]:
        """Call the graph and record many values: ``out, acts = pg.record(input_ids,
        nodes="model.layers_*.mlp.*")`` gives the output and ``{node path: value}``.

        ``nodes``: a glob (``*`` crosses dots), a list of globs and exact paths, or a
        predicate ``path -> bool``; parameters only when named exactly. Values are detached,
        after active patches; copies only where a graph of this call writes in place (see
        :mod:`graphpatch_cache.runtime.recording`). The model's own inputs go in ``args`` and
        ``kwargs`` (pass one named ``nodes`` positionally).

        :raises NodePathError: a glob or path that selects nothing (with close matches).
        """
        return record(self, args, kwargs, nodes)

    def _node_paths(self, variant: Variant) -> NodePath:
        cached = variant.__dict__.get("_node_path")
        if cached is None:
            def binder(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[torch.Tensor]:  # for SymbolicShape.at(...)
                leaves, _ = flat_inputs(self._canonical(args, kwargs))
                return [x for x in leaves if isinstance(x, torch.Tensor)]

            cached = variant.__dict__["_node_path"] = NodePath.from_graph(variant.artifact.root, binder)
        return cached

    # -- patching ------------------------------------------------------------------------------------
    def _sync(self) -> None:
        for variant in self._variants:
            sync(self._patch_stack, variant)

    @contextlib.contextmanager
    def patch(self, patch_map: Mapping[Union[str, NodePath], Union[Patch[Any], Sequence[Patch[Any]]]]) -> Iterator["PatchableGraph"]:
        """Apply patches inside a ``with`` block; nested blocks compose, outer first.

        Keys are node paths as strings or :class:`NodePath` objects (``pg.graph.output.sub_1``
        is ``"output|sub_1"``); see :mod:`graphpatch_cache.runtime.node_path` for how a path
        resolves.

        :raises TypeError: ``patch_map`` is not a dict, or holds something that is not a Patch.
        :raises NodePathError: a path does not exist, or names a part its value's recorded
            structure does not have (the error lists close matches or the parts there are).
        :raises NotAValueError: a path names a module graph rather than a value.
        """
        entries = self._resolver.entries(patch_map)
        self._patch_stack.append(entries)
        try:
            self._sync()
        except BaseException:
            self._patch_stack.pop()
            self._sync()
            forget(self._variants, entries)
            raise
        try:
            yield self
        finally:
            leave(self._patch_stack, entries)
            self._sync()
            forget(self._variants, entries)

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: int = 20, use_cache: Optional[bool] = None, do_sample: bool = False,
                 eos_token_id: Any = None, pad_token_id: Optional[int] = None, **model_kwargs: Any) -> torch.Tensor:
        """Greedy generation through the graph, so active patches apply at every step.

        Equals ``model.generate(input_ids, attention_mask=..., max_new_tokens=N,
        do_sample=False, use_cache=...)``. With ``use_cache=True`` the prompt runs once and each later step feeds one token and the model's
        ``DynamicCache`` through the graph (one graph variant for the prompt, one shape-generic
        variant for every later step); with ``use_cache=False`` each step runs the whole
        sequence. The default (None) follows the model's ``generation_config.use_cache``, and
        steps without a cache (with a warning) for a model whose cache cannot go through a
        graph. As ``model.generate`` does, a decoder-only model gets an ``attention_mask`` when
        none is given (from the padding id where the ids hold it, else all ones) and position
        ids computed from the mask when its forward takes them, so ``pg.generate(ids)`` uses the
        graphs of a tokenizer's batch. An encoder-decoder model (T5, BART, Whisper: ``input_ids`` is
        its main input, ``input_features`` for Whisper) runs its encoder once and returns the
        decoder's sequences (see :mod:`graphpatch_cache.runtime.generate_encdec`).

        :raises UnsupportedCacheError: ``use_cache=True`` for a model whose forward takes no
            cache, or whose cache cannot go through a graph (a static cache, say); the message
            names the model class; ``use_cache=False`` works for every model.
        :raises SignatureMismatchError: for sampling (``do_sample=True``); for an encoder-decoder
            model, a generation setting whose logits processor it does not apply.

        Defaults (``use_cache``, ``eos_token_id``, ``pad_token_id``) come from
        ``pg.generation_config`` (a copy of the model's, which you may change), or from the
        model's when it is None.
        """
        token = GENERATING.set(True)
        try:
            return _generate.generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                      use_cache=use_cache, do_sample=do_sample, eos_token_id=eos_token_id,
                                      pad_token_id=pad_token_id, **model_kwargs)
        finally:
            GENERATING.reset(token)

    # -- portable files ----------------------------------------------------------------------------
    def save(self, file: FileLike) -> None:
        """Write every graph variant to one portable file (pure data: JSON text, never
        weights), for :meth:`load` on another machine.

        :param file: a path (the write is atomic: a reader sees the old file or the new one),
            or a file object open for writing, binary (``open(p, "wb")``, ``io.BytesIO``) or
            text (``open(p, "w")``, ``io.StringIO``); it is written at its position and left open.
        """
        write_portable([v.artifact for v in self._variants], file)

    @classmethod
    def load(
        cls,
        file: FileLike,
        model: Optional[torch.nn.Module] = None,
        *,
        options: Optional[ExtractionOptions] = None,
    ) -> "PatchableGraph":
        """Bind the graphs in a file written by :meth:`save` (or ``graphpatch-cache export``)
        to ``model``. ``file`` is a path or a file object open for reading (binary or text),
        read from its position to its end. Unlike graphpatch's ``load`` (an unpickler), the
        file holds no weights and runs no code: the model comes from you.

        :raises TypeError: no ``model`` (graphpatch's ``load(file)`` took none).
        :raises CacheMissError: no such file.
        :raises ArtifactFormatError: not an artifact file (or an unsupported version), such as
            a file graphpatch's ``pg.save`` wrote (a pickle).
        :raises ModelStructureError: the graphs belong to a differently structured model;
            the error names the module or parameter that differs.
        """
        if model is None:
            raise TypeError(
                "PatchableGraph.load(file, model) binds the saved graphs to a model you pass: the file "
                "holds graphs only, never weights (graphpatch's load(file) unpickled both)"
            )
        artifacts = read_portable_file(file)
        pg = cls.from_artifact(model, artifacts[0], options=options)
        for artifact in artifacts[1:]:
            pg._add_variant(artifact)
        return pg

    # -- copying ---------------------------------------------------------------------------------
    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickling (``torch.save(pg)``, ``pickle.dumps(pg)``, ``copy.copy(pg)``) is refused:
        a pickled graph would hold generated code and the model's weights, and unpickling
        runs code. graphpatch refused a direct ``torch.save(pg)`` too."""
        raise NotPicklableError(
            f"a PatchableGraph of {type(self._model).__name__} cannot be pickled (torch.save, pickle, copy.copy)",
            hint="save its graphs with pg.save(file) (pure data, no weights) and bind them again with "
            "PatchableGraph.load(file, model); save weights with torch.save(model.state_dict(), ...); "
            "copy.deepcopy(pg) copies the model and its graphs",
        )

    def __deepcopy__(self, memo: Dict[int, Any]) -> "PatchableGraph":
        """A PatchableGraph of a deep copy of the model, with the same graphs (every call
        signature's variant, bound again, no extraction), options, ``config`` and
        ``generation_config``. Active patches stay with the ``with pg.patch`` blocks of the
        original: the copy starts unpatched."""
        model = copy.deepcopy(self._model, memo)
        new = type(self).from_artifact(model, self._variants[0].artifact, options=self._options,
                                       extractor=self._extractor)
        memo[id(self)] = new
        for variant in self._variants[1:]:
            new._add_variant(variant.artifact)
        new.config = copy.deepcopy(self.config, memo)
        new.generation_config = copy.deepcopy(self.generation_config, memo)
        return new

    def __repr__(self) -> str:
        return f"PatchableGraph({type(self._model).__name__}, variants={len(self._variants)})"


def _split_options(example_args: Tuple[Any, ...]) -> Tuple[ExtractionOptions, Tuple[Any, ...]]:
    if example_args and isinstance(example_args[0], ExtractionOptions):
        return example_args[0], tuple(example_args[1:])
    return ExtractionOptions(), tuple(example_args)


__all__ = ["Extractor", "PatchableGraph", "Variant"]
