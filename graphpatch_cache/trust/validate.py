"""The loader's trust boundary: bytes from a shared cache or a portable file -> a checked artifact.

Every door through which an artifact enters a process (a cache blob, ``PatchableGraph.load``,
``graphpatch-cache import``/``verify``) goes through :func:`read_artifact` or
:func:`read_portable`: JSON parse, JSON Schema, then :func:`check_artifact`, the static
rules that need no model:

- **targets**: every ``call_function`` target is on the closed allowlist
  (:mod:`graphpatch_cache.trust.allowlist`) or registered; every ``call_method`` is a listed Tensor
  method; ``builtins.getattr`` only with a literal attribute name from the list;
- **arguments**: values are data (numbers, strings, dtypes, devices, containers of them,
  references to earlier nodes); no callables (``fn`` values), no dunder strings, no
  ``key=``/``out=`` arguments, bounded ints, sizes and nesting; the graph's own helper
  functions get exactly the argument shapes extraction writes;
- **structure**: names are identifiers (no keywords, no dunders), references point to
  earlier nodes of the same graph, one ``output`` last, placeholders first and matching the
  signature or the calling node, ``get_attr``/``call_module`` targets exist, arity and
  keyword names fit the target's schema, specs name only containers and ModelOutputs.

Binding (:mod:`graphpatch_cache.runtime.bind`) adds what needs the live model (attributes are
the module's own parameters and buffers, no write into a parameter). Results are memoized
per sha256 of the bytes, so a cache hit pays once per blob and process.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .. import _compat
from ..artifact import GraphArtifact, ModuleGraph, artifact_from_bytes, portable_from_bytes
from ..errors import ArtifactFormatError, GraphPatchCacheError, ProtectedWriteError
from . import functions  # noqa: F401  (registers the graph functions the rules name)
from .allowlist import check_method, function_for_checks, is_dunder
from .digests import ValidatedDigests, validation_tag
from .op_schemas import function_signatures, kind, method_signatures, signature_fits
from .rules import MODULE_ATTRIBUTE, MODULE_REF, RULES, TAKES_MODULE, ref
from .values import ValueChecker
from .writes import may_alias_input, written_inputs
from ..artifact.names import join_path

#: bounds that no real graph comes near; past them an artifact is refused quickly
MAX_NODES = 500_000  # per artifact
MAX_GRAPHS = 100_000  # module graphs per artifact
MAX_GRAPH_DEPTH = 64  # nesting of module graphs

_SEGMENT = re.compile(r"^[A-Za-z0-9_]+$")
_CALLS_KEY = frozenset({"builtins.max", "builtins.min", "builtins.sorted"})
_CHECKED: Dict[str, GraphArtifact] = {}
_FITS: Dict[Tuple[Any, ...], bool] = {}  # (target, argument kinds, keyword kinds) -> fits its schema


# -- doors -------------------------------------------------------------------------------------
def read_artifact(data: bytes, path: str, *, remembered: Optional[ValidatedDigests] = None) -> GraphArtifact:
    """Parse, schema-validate and check one artifact (a cache blob).

    :param remembered: digests validated before (:mod:`.digests`); check_artifact runs anyway.
    :raises ArtifactFormatError: not an artifact, malformed, or an unsupported version.
    :raises DisallowedTargetError: the graphs name something outside the allowlist.
    """
    digest = hashlib.sha256(data).hexdigest()
    artifact = _CHECKED.get(digest)
    if artifact is None:
        tag = validation_tag() if remembered is not None else ""
        known = remembered is not None and remembered.validated(digest, tag)  # (keyed by this digest)
        artifact = _guarded(lambda: artifact_from_bytes(data, path, validate=not known), path)
        check_artifact(artifact, path=path)
        _CHECKED[digest] = artifact
        if remembered is not None and not known:
            remembered.mark_validated(digest, tag)
    return artifact


def read_portable(data: bytes, path: str) -> List[GraphArtifact]:
    """Parse and check every artifact of a portable file (``pg.save``/``export``)."""
    artifacts: List[GraphArtifact] = _guarded(lambda: portable_from_bytes(data, path), path)
    for artifact in artifacts:
        check_artifact(artifact, path=path)
    return artifacts


def _guarded(parse: Callable[[], Any], path: str) -> Any:
    """Parsing hostile JSON must end in a typed error, never a RecursionError/MemoryError."""
    try:
        return parse()
    except GraphPatchCacheError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise ArtifactFormatError(f"{path} is not a well-formed graph artifact ({type(exc).__name__}: {exc!s:.200})",
                                  path=path, hint="the file is damaged or not written by graphpatch-cache") from exc


# -- the checks --------------------------------------------------------------------------------
def check_artifact(artifact: GraphArtifact, *, path: str = "") -> None:
    """Refuse anything a loader must not bind (see ``cache_schema/SPEC.md``, "Trust").

    :raises DisallowedTargetError: a node names a target, method, attribute or value outside
        the allowlist and its argument rules; the error names the node path and the target.
    :raises ArtifactFormatError: the graphs are malformed (references, arity, bounds).
    """
    if artifact.__dict__.get("_graphpatch_checked"):
        return
    checker = _Checker(path)
    try:
        checker.spec(artifact.input_spec, "input_spec")
        checker.signature(artifact.signature, "signature")
        if not isinstance(artifact.root, ModuleGraph):
            raise checker.malformed("", "the root is not a module graph")
        checker.params = checker.structure(artifact.extraction.get("structure"))
        checker.devices(artifact.extraction.get("devices", []))
        tensors = sum(1 for leaf in artifact.signature.get("leaves", []) if leaf.get("kind") == "tensor")
        checker.graph(artifact.root, "", 0, placeholders=tensors)
        object.__setattr__(artifact, "_graphpatch_checked", True)  # frozen dataclass: checked once
    except (GraphPatchCacheError, _compat.UnsafeSpecError):
        raise
    except (RecursionError, ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        raise ArtifactFormatError(f"{path or 'artifact'}: malformed graph data ({type(exc).__name__}: {exc!s:.200})",
                                  path=path, hint="the file is damaged or not written by graphpatch-cache") from exc


class _Checker(ValueChecker):
    """The structural checks of one artifact (the value checks are :class:`ValueChecker`'s)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.nodes = 0
        self.graphs = 0
        #: qualified names of the model's parameters (None: unknown, every attribute counts)
        self.params: Optional[Set[str]] = None
        self.checked_graphs: Dict[Tuple[Any, ...], Dict[str, Optional[int]]] = {}
        self.attribute_nodes: Dict[str, str] = {}  # (per graph, see nodes_of)
        #: module path -> names of its parameters, buffers and children (recorded structure)
        self.members: Dict[str, Set[str]] = {}
        self.module_path = ""  # of the graph being checked

    def structure(self, s: Any) -> Optional[Set[str]]:
        """The recorded model structure (binding compares it with the live model): its shape,
        and the parameter names it lists."""
        if s is None:
            return None
        ok = isinstance(s, dict) and isinstance(s.get("modules"), list) and isinstance(s.get("tensors"), list) and all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in s["modules"]) and all(
            isinstance(t, list) and len(t) == 5 and t[0] in ("param", "buffer") and isinstance(t[1], str)
            and isinstance(t[2], list) and all(type(d) is int for d in t[2]) and isinstance(t[3], str)
            and (t[4] is None or isinstance(t[4], str)) for t in s["tensors"])
        if not ok:
            raise self.malformed("extraction.structure", "the recorded model structure is malformed")
        # each module's direct tensors and children: an opaque graph's attribute nodes may
        # name neither (parameters bind by get_attr, shape-checked and write-guarded)
        for name in [t[1] for t in s["tensors"]] + [m[0] for m in s["modules"] if m[0]]:
            owner, _, member = name.rpartition(".")
            self.members.setdefault(owner, set()).add(member)
        return {t[1] for t in s["tensors"] if t[0] == "param"}

    def graph(self, g: ModuleGraph, where: str, depth: int, placeholders: Optional[int]) -> None:
        self.graphs += 1
        if depth > MAX_GRAPH_DEPTH or self.graphs > MAX_GRAPHS:
            raise self.malformed(where, "module graphs nested too deeply or too many")
        if g.name and not self.identifier(g.name):
            raise self.refuse(where, g.name, "a graph name must be an identifier, not a keyword or dunder")
        if g.module_path and not all(_SEGMENT.fullmatch(p) and not is_dunder(p) for p in g.module_path.split(".")):
            raise self.refuse(where, g.module_path, "module_path must be dotted attribute names without dunders")
        if not isinstance(g.module_class, str) or not g.module_class.isprintable() or len(g.module_class) > 1024:
            raise self.malformed(where, "module_class must be a class name")  # compared, never resolved
        prefix = g.module_path + "." if g.module_path else ""
        for local, qualified in g.attributes.items():
            if not self.identifier(local) and local != MODULE_REF:
                raise self.refuse(where, local, "attribute names must be identifiers, not keywords or dunders")
            if not isinstance(qualified, str) or not qualified.startswith(prefix) or not all(
                    _SEGMENT.fullmatch(p) and not is_dunder(p) for p in qualified.split(".")):
                raise self.refuse(join_path(where, local), qualified,
                                  "an attribute must name a tensor of the graph's own module (dotted names, "
                                  "no dunders)")
            base = re.sub(r"\W", "_", qualified[len(prefix):])
            if not re.fullmatch(rf"(sub_)?{re.escape(base)}(_\d+)?_*", local):
                raise self.refuse(join_path(where, local), qualified,
                                  f"attribute {local!r} binds {qualified!r}: a local name is its tensor's name")
        if g.input_spec is not None:
            self.spec(g.input_spec, where)
        if g.call_signature is not None:
            self.signature(g.call_signature, where)
            placeholders = sum(1 for leaf in g.call_signature.get("leaves", []) if leaf.get("kind") == "tensor")
        children = {c.name: c for c in g.children}
        if len(children) != len(g.children):
            raise self.malformed(where, "two child graphs share a name")
        calls = self.nodes_of_once(g, where, children, placeholders)
        for child in g.children:
            self.graph(child, f"{where}.{child.name}" if where else child.name, depth + 1, calls.get(child.name))

    def nodes_of_once(self, g: ModuleGraph, gpath: str, children: Dict[str, ModuleGraph],
                      placeholders: Optional[int]) -> Dict[str, Optional[int]]:
        """:meth:`nodes_of`, once per distinct graph content: a model's repeated layers have
        identical node lists (only their attributes' module paths differ), so each is checked
        once per artifact. Everything the node checks depend on is in the key."""
        try:
            key = (g.kind, placeholders, tuple(children), frozenset(self.members.get(g.module_path, ())), tuple(sorted(
                (local, self.params is None or q in self.params) for local, q in g.attributes.items())),
                g.nodes_key())
        except (TypeError, ValueError):  # not JSON data: check it the long way
            return self.nodes_of(g, gpath, children, placeholders)
        calls = self.checked_graphs.get(key)
        if calls is None:
            calls = self.checked_graphs[key] = self.nodes_of(g, gpath, children, placeholders)
        else:
            self.nodes += len(g.nodes)
            if self.nodes > MAX_NODES:
                raise self.malformed(gpath, "too many nodes")
        return calls

    def nodes_of(self, g: ModuleGraph, gpath: str, children: Dict[str, ModuleGraph],
                 placeholders: Optional[int]) -> Dict[str, Optional[int]]:
        """Check one graph's nodes; returns child name -> number of inputs its calls pass."""
        self.attribute_nodes = {}  # module_attribute node name -> the attribute it reads
        self.module_path = g.module_path
        self.nodes += len(g.nodes)
        if self.nodes > MAX_NODES:
            raise self.malformed(gpath, "too many nodes")
        state = _GraphState(g, children)
        for i, nd in enumerate(g.nodes):
            where = self.node_name(nd, gpath, state)
            refs = self.references(nd, where, state)
            args, kwargs, kwnames = self.arguments(nd, where)
            self.node(nd, where, i, args, kwargs, kwnames, refs, state)
            state.seen[nd.name] = nd.op
        if state.outputs != 1:
            raise self.malformed(gpath, "a graph must end in exactly one output node")
        if placeholders is not None and placeholders != state.placeholders:
            raise self.malformed(gpath, f"the graph has {state.placeholders} inputs but is called with {placeholders}")
        return state.calls

    def node_name(self, nd: Any, gpath: str, state: "_GraphState") -> str:
        """The node's path, after checking its name is a new identifier before the output."""
        if not self.identifier(nd.name):
            raise self.refuse(f"{gpath}.{nd.name!s:.40}", nd.name, "node names must be identifiers, not keywords "
                              "or dunders")
        where = f"{gpath}.{nd.name}" if gpath else nd.name
        if nd.name in state.seen:
            raise self.malformed(where, "two nodes share a name")
        if state.outputs:
            raise self.malformed(where, "a node after the output node")
        return where

    def references(self, nd: Any, where: str, state: "_GraphState") -> Set[str]:
        """The nodes ``nd``'s arguments refer to (earlier nodes of this graph), after checking
        the arguments are data."""
        refs: Set[str] = set()
        self.value(nd.args, where, nd.target, 0, refs)
        self.value(nd.kwargs, where, nd.target, 0, refs)
        for name in refs:
            if name not in state.seen:
                raise self.malformed(where, f"a reference to {name!r}, which is not an earlier node of this graph")
            if name == MODULE_REF and not (nd.op == "call_function" and nd.target in TAKES_MODULE
                                           and _first_ref(nd.args) == name and _count(nd, name) == 1):
                raise self.refuse(where, nd.target, "the module reference may only be the first argument of "
                                  "the graph's own opaque/8-bit call")
        return refs

    def arguments(self, nd: Any, where: str) -> Tuple[List[Any], List[Any], List[str]]:
        """The node's positional arguments, keyword (name, value) pairs and keyword names."""
        if not isinstance(nd.args, dict) or set(nd.args) != {"t"} or not isinstance(nd.kwargs, dict) or (
                set(nd.kwargs) != {"d"}):
            raise self.malformed(where, "args must be an encoded tuple and kwargs an encoded dict")
        args, kwargs = nd.args["t"], nd.kwargs["d"]
        kwnames = []
        for pair in kwargs:
            if not isinstance(pair[0], str) or not self.identifier(pair[0]):
                raise self.refuse(where, nd.target, "keyword names must be identifiers")
            kwnames.append(pair[0])
        if len(set(kwnames)) != len(kwnames):
            raise self.malformed(where, "a keyword given twice")
        return args, kwargs, kwnames

    def node(self, nd: Any, where: str, i: int, args: List[Any], kwargs: List[Any], kwnames: List[str],
             refs: Set[str], state: "_GraphState") -> None:
        """The checks of the node's op."""
        if nd.op == "placeholder":
            if state.placeholders != i:
                raise self.malformed(where, "placeholders must come first")
            state.placeholders += 1
            if not self.identifier(nd.target) or kwargs or len(args) > 1:
                raise self.malformed(where, "malformed placeholder")
        elif nd.op == "get_attr":
            self.get_attr(nd, where, args, kwargs, state)
        elif nd.op == "call_module":
            if nd.target not in state.children:
                raise self.malformed(where, f"call of unknown child graph {nd.target!r}")
            n = len(args) + len(kwargs)
            if state.calls.setdefault(nd.target, n) != n:
                raise self.malformed(where, "calls of one child graph pass different numbers of inputs")
        elif nd.op == "call_function":
            self.call_function(nd, where, args, kwnames, kwargs)
            self.writes(nd, where, function_for_checks(nd.target), args, kwargs, refs, state.aliasing)
            if nd.target == MODULE_ATTRIBUTE:
                self.attribute_nodes[nd.name] = args[1]
        elif nd.op == "call_method":
            check_method(nd.target, node_path=where)
            if not args or ref(args[0]) is None:
                raise self.refuse(where, nd.target, "a method call needs a node as its object")
            self.arity(where, nd.target, method_signatures(nd.target), args, kwargs)
            self.writes(nd, where, None, args, kwargs, refs, state.aliasing)
        elif nd.op == "output":
            state.outputs += 1
            if len(args) != 1 or kwargs:
                raise self.malformed(where, "the output node takes exactly one value")
            if nd.meta.get("extras") and not (isinstance(args[0], dict) and len(args[0].get("t", ())) == 2):
                raise self.malformed(where, "an output with extras must be a (value, extras) pair")
        else:
            raise self.malformed(where, f"unknown op {nd.op!r}")

    def get_attr(self, nd: Any, where: str, args: List[Any], kwargs: List[Any], state: "_GraphState") -> None:
        if args or kwargs:
            raise self.malformed(where, "get_attr takes no arguments")
        g = state.graph
        if nd.target == MODULE_REF:
            if g.kind not in ("opaque", "leaf") or nd.name != MODULE_REF:
                raise self.refuse(where, nd.target, "only opaque and 8-bit leaf graphs reference their module")
        elif nd.target not in g.attributes:
            raise self.refuse(where, nd.target, "get_attr of an undeclared attribute")
        elif self.params is None or g.attributes[nd.target] in self.params:
            state.aliasing.add(nd.name)
        self.meta_shape(nd.meta, where)

    def call_function(self, nd: Any, where: str, args: List[Any], kwnames: List[str], kwargs: List[Any]) -> None:
        target = nd.target
        fn = function_for_checks(target, node_path=where)
        if target in _CALLS_KEY and "key" in kwnames:
            raise self.refuse(where, target, "key= would call what it is given")
        if "out" in kwnames:
            raise self.refuse(where, target, "out= writes into a tensor the graph did not create")
        rule = RULES.get(target)
        if rule is not None:
            rule(self, where, target, args, kwnames)
        self.arity(where, target, function_signatures(target, fn), args, kwargs)

    def writes(self, nd: Any, where: str, fn: Any, args: List[Any], kwargs: List[Any], refs: Set[str],
               aliasing: Set[str]) -> None:
        """Refuse a write into (a view of) a parameter; track what may alias one."""
        written = written_inputs(nd.op, nd.target, fn, args, dict(kwargs))
        for value in written:
            if ref(value) in aliasing:
                raise ProtectedWriteError(
                    f"node {where!r} ({nd.target}) writes into {ref(value)!r}, which is (a view of) a parameter",
                    node_path=where, target=str(nd.target),
                    hint="graphs may not modify weights; do not load artifacts you do not trust")
        if refs & aliasing and may_alias_input(nd.op, nd.target, fn):
            aliasing.add(nd.name)

    def arity(self, where: str, target: str, signatures: Optional[List[Any]], args: List[Any],
              kwargs: List[Any]) -> None:
        if signatures is None:  # no schema known (a few C builtins): the argument rules still hold
            return
        key = (target, tuple(kind(a) for a in args), tuple((k, kind(v)) for k, v in kwargs))
        fits = _FITS.get(key)
        if fits is None:
            fits = _FITS[key] = any(signature_fits(sig, key[1], key[2]) for sig in signatures)
        if not fits:
            raise self.malformed(where, f"{len(args)} positional arguments and keywords {[k for k, _ in kwargs]} "
                                 f"(or their types) do not fit {target}")


class _GraphState:
    """What :meth:`_Checker.nodes_of` learns while it walks one graph's nodes."""

    __slots__ = ("graph", "children", "seen", "aliasing", "calls", "outputs", "placeholders")

    def __init__(self, graph: ModuleGraph, children: Dict[str, ModuleGraph]) -> None:
        self.graph, self.children = graph, children
        self.seen: Dict[str, str] = {}  # node name -> op
        self.aliasing: Set[str] = set()  # nodes whose value may share storage with a parameter
        self.calls: Dict[str, Optional[int]] = {}  # child graph -> number of inputs its calls pass
        self.outputs = 0
        self.placeholders = 0


def _first_ref(args: Any) -> Optional[str]:
    items = args.get("t") if isinstance(args, dict) else None
    return ref(items[0]) if items else None


def _count(nd: Any, name: str) -> int:
    found = [0]

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if ref(v) == name:
                found[0] += 1
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(nd.args)
    walk(nd.kwargs)
    return found[0]


__all__ = ["MAX_NODES", "check_artifact", "may_alias_input", "read_artifact", "read_portable", "written_inputs"]
