"""The loader's trust boundary: bytes from a shared cache or a portable file -> a checked artifact.

Every door through which an artifact enters a process (a cache blob, ``PatchableGraph.load``,
``graphpatch-cache import``/``verify``) goes through :func:`read_artifact` or
:func:`read_portable`: JSON parse, JSON Schema, then :func:`check_artifact`, the static
rules that need no model:

- **targets**: every ``call_function`` target is on the closed allowlist
  (:mod:`graphpatch_cache.allowlist`) or registered; every ``call_method`` is a listed Tensor
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
import inspect
import json
import keyword
import re
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import torch

from .. import _compat
from . import functions  # noqa: F401  (registers the graph functions the rules name)
from .allowlist import attribute_allowed, check_method, is_dunder, resolve_function, valid_dotted
from ..artifact import GraphArtifact, ModuleGraph, artifact_from_bytes, portable_from_bytes
from ..errors import ArtifactFormatError, DisallowedTargetError, GraphPatchCacheError, ProtectedWriteError

#: bounds that no real graph comes near; past them an artifact is refused quickly
MAX_NODES = 500_000  # per artifact
MAX_GRAPHS = 100_000  # module graphs per artifact
MAX_GRAPH_DEPTH = 64  # nesting of module graphs
MAX_VALUE_DEPTH = 32  # nesting of containers inside one argument
MAX_CONTAINER = 65_536  # elements of one container
MAX_STRING = 1 << 20  # characters of one string (pytree specs are the long ones)
MAX_INT = 1 << 63

MODULE_REF = "_graphpatch_module"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_]+$")
_DUNDER_PART = re.compile(r"(^|\.)__\w+__($|\.)")
_DEVICE = re.compile(r"^(cpu|cuda|meta|mps|xpu|hpu|npu|xla|privateuseone)(:[0-9]{1,4})?$")
_CALLS_KEY = frozenset({"builtins.max", "builtins.min", "builtins.sorted"})
_TAGS = frozenset({"n", "f", "size", "t", "l", "d", "s", "e", "dtype", "device", "mf", "layout", "c", "fn"})

_CHECKED: Dict[str, GraphArtifact] = {}
_SPECS_OK: Set[str] = set()  # specs already checked
_IDENTIFIERS: Set[str] = set()  # names already found to be identifiers (layers repeat them)
_FITS: Dict[Tuple[Any, ...], bool] = {}  # (target, argument kinds, keyword kinds) -> fits its schema


# -- doors -------------------------------------------------------------------------------------
def read_artifact(data: bytes, path: str) -> GraphArtifact:
    """Parse, schema-validate and check one artifact (a cache blob).

    :raises ArtifactFormatError: not an artifact, malformed, or an unsupported version.
    :raises DisallowedTargetError: the graphs name something outside the allowlist.
    """
    digest = hashlib.sha256(data).hexdigest()
    artifact = _CHECKED.get(digest)
    if artifact is None:
        artifact = _guarded(lambda: artifact_from_bytes(data, path), path)
        check_artifact(artifact, path=path)
        _CHECKED[digest] = artifact
    return artifact


def read_portable(data: bytes, path: str) -> List[GraphArtifact]:
    """Parse and check every artifact of a portable file (``pg.save``/``export``)."""
    artifacts = _guarded(lambda: portable_from_bytes(data, path), path)
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
        tensors = sum(1 for leaf in artifact.signature.get("leaves", []) if leaf.get("kind") == "tensor")
        checker.graph(artifact.root, "", 0, placeholders=tensors)
        object.__setattr__(artifact, "_graphpatch_checked", True)  # frozen dataclass: checked once
    except (GraphPatchCacheError, _compat.UnsafeSpecError):
        raise
    except (RecursionError, ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        raise ArtifactFormatError(f"{path or 'artifact'}: malformed graph data ({type(exc).__name__}: {exc!s:.200})",
                                  path=path, hint="the file is damaged or not written by graphpatch-cache") from exc


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path
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

    # errors
    def malformed(self, where: str, why: str) -> ArtifactFormatError:
        at = f" at {where}" if where else ""
        return ArtifactFormatError(f"{self.path or 'artifact'}: {why}{at}", path=self.path,
                                   hint="the file is damaged or not written by graphpatch-cache; rebuild it")

    def refuse(self, where: str, target: str, why: str) -> DisallowedTargetError:
        return DisallowedTargetError(
            f"refusing node {where or '<root>'!r} ({target!s:.80}): {why}", node_path=where, target=str(target)[:200],
            hint="this artifact asks for something graphs may not do; do not load artifacts you do not trust "
            "(rebuild it: graphpatch-cache verify --rebuild, or remove it: graphpatch-cache rm)")

    # pieces
    def spec(self, text: Any, where: str) -> None:
        if not isinstance(text, str):
            raise self.malformed(where, "a pytree spec is not a string")
        if text in _SPECS_OK:
            return
        try:
            _compat.check_spec(text, strict=False)
        except _compat.UnsafeSpecError as exc:
            raise self.refuse(where, "pytree spec", str(exc)) from None
        if len(_SPECS_OK) < 10_000:
            _SPECS_OK.add(text)

    def signature(self, sig: Any, where: str) -> None:
        if not isinstance(sig, dict) or not isinstance(sig.get("leaves"), list):
            raise self.malformed(where, "malformed signature")
        self.spec(sig.get("spec"), where)
        for leaf in sig["leaves"]:
            if not isinstance(leaf, dict):
                raise self.malformed(where, "malformed signature leaf")
            if leaf.get("kind") == "const":  # compared with the call's constants, never decoded
                self.inert(leaf.get("value"), where, 0)

    def inert(self, v: Any, where: str, depth: int) -> None:
        """Data that is only compared: bounded JSON."""
        if depth > MAX_VALUE_DEPTH:
            raise self.malformed(where, "a signature constant nested too deeply")
        if isinstance(v, (list, dict)):
            if len(v) > MAX_CONTAINER:
                raise self.malformed(where, "a signature constant too large")
            for item in (v.values() if isinstance(v, dict) else v):
                self.inert(item, where, depth + 1)
        elif isinstance(v, str) and len(v) > MAX_STRING:
            raise self.malformed(where, "a signature constant too long")

    def graph(self, g: ModuleGraph, where: str, depth: int, placeholders: Optional[int]) -> None:
        self.graphs += 1
        if depth > MAX_GRAPH_DEPTH or self.graphs > MAX_GRAPHS:
            raise self.malformed(where, "module graphs nested too deeply or too many")
        if g.name and not self.identifier(g.name):
            raise self.refuse(where, g.name, "a graph name must be an identifier, not a keyword or dunder")
        if g.module_path and not all(_SEGMENT.match(p) and not is_dunder(p) for p in g.module_path.split(".")):
            raise self.refuse(where, g.module_path, "module_path must be dotted attribute names without dunders")
        if not isinstance(g.module_class, str) or not g.module_class.isprintable() or len(g.module_class) > 1024:
            raise self.malformed(where, "module_class must be a class name")  # compared, never resolved
        prefix = g.module_path + "." if g.module_path else ""
        for local, qualified in g.attributes.items():
            if not self.identifier(local) and local != MODULE_REF:
                raise self.refuse(where, local, "attribute names must be identifiers, not keywords or dunders")
            if not isinstance(qualified, str) or not qualified.startswith(prefix) or not all(
                    _SEGMENT.match(p) and not is_dunder(p) for p in qualified.split(".")):
                raise self.refuse(f"{where}.{local}" if where else local, qualified,
                                  "an attribute must name a tensor of the graph's own module (dotted names, "
                                  "no dunders)")
            base = re.sub(r"\W", "_", qualified[len(prefix):])
            if not re.fullmatch(rf"(sub_)?{re.escape(base)}(_\d+)?_*", local):
                raise self.refuse(f"{where}.{local}" if where else local, qualified,
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

    @staticmethod
    def identifier(name: Any) -> bool:
        if name in _IDENTIFIERS:
            return True
        ok = isinstance(name, str) and bool(_IDENTIFIER.match(name)) and not keyword.iskeyword(name) \
            and not is_dunder(name)
        if ok and len(_IDENTIFIERS) < 100_000:
            _IDENTIFIERS.add(name)
        return ok

    def nodes_of_once(self, g: ModuleGraph, gpath: str, children: Dict[str, ModuleGraph],
                      placeholders: Optional[int]) -> Dict[str, Optional[int]]:
        """:meth:`nodes_of`, once per distinct graph content: a model's repeated layers have
        identical node lists (only their attributes' module paths differ), so each is checked
        once per artifact. Everything the node checks depend on is in the key."""
        try:
            key = (g.kind, placeholders, tuple(children), frozenset(self.members.get(g.module_path, ())), tuple(sorted(
                (local, self.params is None or q in self.params) for local, q in g.attributes.items())),
                json.dumps([[n.name, n.op, n.target, n.args, n.kwargs, n.meta] for n in g.nodes], sort_keys=True))
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
        seen: Dict[str, str] = {}  # node name -> op
        self.attribute_nodes: Dict[str, str] = {}  # module_attribute node name -> the attribute it reads
        self.module_path = g.module_path
        aliasing: Set[str] = set()  # nodes whose value may share storage with a parameter
        calls: Dict[str, Optional[int]] = {}
        outputs = 0
        n_placeholders = 0
        self.nodes += len(g.nodes)
        if self.nodes > MAX_NODES:
            raise self.malformed(gpath, "too many nodes")
        for i, nd in enumerate(g.nodes):
            if not self.identifier(nd.name):
                raise self.refuse(f"{gpath}.{nd.name!s:.40}", nd.name, "node names must be identifiers, not keywords "
                                  "or dunders")
            where = f"{gpath}.{nd.name}" if gpath else nd.name
            if nd.name in seen:
                raise self.malformed(where, "two nodes share a name")
            if outputs:
                raise self.malformed(where, "a node after the output node")
            refs: Set[str] = set()
            self.value(nd.args, where, nd.target, 0, refs)
            self.value(nd.kwargs, where, nd.target, 0, refs)
            for ref in refs:
                if ref not in seen:
                    raise self.malformed(where, f"a reference to {ref!r}, which is not an earlier node of this graph")
                if ref == MODULE_REF and not (nd.op == "call_function" and nd.target in _TAKES_MODULE
                                              and _first_ref(nd.args) == ref and _count(nd, ref) == 1):
                    raise self.refuse(where, nd.target, "the module reference may only be the first argument of "
                                      "the graph's own opaque/8-bit call")
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
            if nd.op == "placeholder":
                if n_placeholders != i:
                    raise self.malformed(where, "placeholders must come first")
                n_placeholders += 1
                if not self.identifier(nd.target) or kwargs or len(args) > 1:
                    raise self.malformed(where, "malformed placeholder")
            elif nd.op == "get_attr":
                if args or kwargs:
                    raise self.malformed(where, "get_attr takes no arguments")
                if nd.target == MODULE_REF:
                    if g.kind not in ("opaque", "leaf") or nd.name != MODULE_REF:
                        raise self.refuse(where, nd.target, "only opaque and 8-bit leaf graphs reference their module")
                elif nd.target not in g.attributes:
                    raise self.refuse(where, nd.target, "get_attr of an undeclared attribute")
                elif self.params is None or g.attributes[nd.target] in self.params:
                    aliasing.add(nd.name)
                self.meta_shape(nd.meta, where)
            elif nd.op == "call_module":
                if nd.target not in children:
                    raise self.malformed(where, f"call of unknown child graph {nd.target!r}")
                n = len(args) + len(kwargs)
                if calls.setdefault(nd.target, n) != n:
                    raise self.malformed(where, "calls of one child graph pass different numbers of inputs")
            elif nd.op == "call_function":
                self.call_function(nd, where, args, kwnames, kwargs)
                self.writes(nd, where, resolve_function(nd.target), args, kwargs, refs, aliasing)
                if nd.target == _MODULE_ATTRIBUTE:
                    self.attribute_nodes[nd.name] = args[1]
            elif nd.op == "call_method":
                check_method(nd.target, node_path=where)
                if not args or _ref(args[0]) is None:
                    raise self.refuse(where, nd.target, "a method call needs a node as its object")
                self.arity(where, nd.target, _method_signatures(nd.target), args, kwargs)
                self.writes(nd, where, None, args, kwargs, refs, aliasing)
            elif nd.op == "output":
                outputs += 1
                if len(args) != 1 or kwargs:
                    raise self.malformed(where, "the output node takes exactly one value")
                if nd.meta.get("extras") and not (isinstance(args[0], dict) and len(args[0].get("t", ())) == 2):
                    raise self.malformed(where, "an output with extras must be a (value, extras) pair")
            else:
                raise self.malformed(where, f"unknown op {nd.op!r}")
            seen[nd.name] = nd.op
        if outputs != 1:
            raise self.malformed(gpath, "a graph must end in exactly one output node")
        if placeholders is not None and placeholders != n_placeholders:
            raise self.malformed(gpath, f"the graph has {n_placeholders} inputs but is called with {placeholders}")
        return calls

    def call_function(self, nd: Any, where: str, args: List[Any], kwnames: List[str], kwargs: List[Any]) -> None:
        target = nd.target
        fn = resolve_function(target, node_path=where)
        if target in _CALLS_KEY and "key" in kwnames:
            raise self.refuse(where, target, "key= would call what it is given")
        if "out" in kwnames:
            raise self.refuse(where, target, "out= writes into a tensor the graph did not create")
        rule = _RULES.get(target)
        if rule is not None:
            rule(self, where, target, args, kwnames)
        self.arity(where, target, _function_signatures(target, fn), args, kwargs)

    def writes(self, nd: Any, where: str, fn: Any, args: List[Any], kwargs: List[Any], refs: Set[str],
               aliasing: Set[str]) -> None:
        """Refuse a write into (a view of) a parameter; track what may alias one."""
        written = written_inputs(nd.op, nd.target, fn, args, dict(kwargs))
        for value in written:
            if _ref(value) in aliasing:
                raise ProtectedWriteError(
                    f"node {where!r} ({nd.target}) writes into {_ref(value)!r}, which is (a view of) a parameter",
                    node_path=where, target=str(nd.target),
                    hint="graphs may not modify weights; do not load artifacts you do not trust")
        if refs & aliasing and may_alias_input(nd.op, nd.target, fn):
            aliasing.add(nd.name)

    def meta_shape(self, meta: Any, where: str) -> None:
        """Binding compares a get_attr's recorded shape and dtype with the live tensor's."""
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if shape is not None and not (isinstance(shape, list) and len(shape) <= 64 and all(
                type(d) is int or isinstance(d, str) for d in shape)):
            raise self.malformed(where, "a malformed recorded shape")
        if isinstance(meta, dict) and "dtype" in meta and not isinstance(meta["dtype"], str):
            raise self.malformed(where, "a malformed recorded dtype")

    def arity(self, where: str, target: str, signatures: Optional[List[Any]], args: List[Any],
              kwargs: List[Any]) -> None:
        if signatures is None:  # no schema known (a few C builtins): the argument rules still hold
            return
        key = (target, tuple(_kind(a) for a in args), tuple((k, _kind(v)) for k, v in kwargs))
        fits = _FITS.get(key)
        if fits is None:
            fits = _FITS[key] = any(_fits(sig, key[1], key[2]) for sig in signatures)
        if not fits:
            raise self.malformed(where, f"{len(args)} positional arguments and keywords {[k for k, _ in kwargs]} "
                                 f"(or their types) do not fit {target}")

    def value(self, v: Any, where: str, target: Any, depth: int, refs: Set[str]) -> None:
        if depth > MAX_VALUE_DEPTH:
            raise self.malformed(where, "an argument nested too deeply")
        if v is None or v is True or v is False:
            return
        if type(v) is dict and len(v) == 1 and "n" in v and type(v["n"]) is str:  # the common case: a reference
            refs.add(v["n"])
            return
        if isinstance(v, int):
            if not -MAX_INT <= v < MAX_INT:
                raise self.malformed(where, "an integer argument out of range")
            return
        if isinstance(v, str):
            if len(v) > MAX_STRING:
                raise self.malformed(where, "a string argument too long")
            if is_dunder(v) or (len(v) < 4096 and _DUNDER_PART.search(v)):
                raise self.refuse(where, target, f"a dunder name {v[:60]!r} as an argument")
            return
        if isinstance(v, list):
            if len(v) > MAX_CONTAINER:
                raise self.malformed(where, "an argument container too large")
            for item in v:
                self.value(item, where, target, depth + 1, refs)
            return
        if not isinstance(v, dict) or len(v) != 1:
            raise self.malformed(where, "an argument that is not an encoded value")
        (tag, x), = v.items()
        if tag not in _TAGS:
            raise self.malformed(where, f"unknown value tag {tag!r}")
        if tag == "n":
            if not isinstance(x, str):
                raise self.malformed(where, "a malformed node reference")
            refs.add(x)
        elif tag == "fn":
            raise self.refuse(where, target, f"a callable argument ({x!s:.80}): graphs pass data, not functions")
        elif tag == "f":
            if not isinstance(x, str) or len(x) > 64:
                raise self.malformed(where, "a malformed float")
            float.fromhex(x)  # ValueError -> ArtifactFormatError
        elif tag == "c":
            if not (isinstance(x, list) and len(x) == 2 and all(isinstance(i, str) and len(i) <= 64 for i in x)):
                raise self.malformed(where, "a malformed complex number")
            float.fromhex(x[0]), float.fromhex(x[1])
        elif tag == "device":
            if not isinstance(x, str) or not _DEVICE.match(x):
                raise self.malformed(where, f"an unknown device {x!s:.40}")
        elif tag in ("dtype", "mf", "layout"):
            if not isinstance(x, str) or x not in _NAMED[tag]:
                raise self.malformed(where, f"an unknown {tag} {x!s:.40}")
        elif tag == "e":
            if x != 1:
                raise self.malformed(where, "a malformed Ellipsis")
        elif tag == "s":
            if not isinstance(x, list) or len(x) != 3:
                raise self.malformed(where, "a malformed slice")
            self.value(x, where, target, depth + 1, refs)
        elif tag == "d":
            if not isinstance(x, list) or len(x) > MAX_CONTAINER:
                raise self.malformed(where, "a malformed dict")
            for pair in x:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise self.malformed(where, "a malformed dict entry")
                if isinstance(pair[0], (list, dict)) and not _hashable(pair[0]):
                    raise self.malformed(where, "an unhashable dict key")
                self.value(pair[0], where, target, depth + 1, refs)
                self.value(pair[1], where, target, depth + 1, refs)
        else:  # t, l, size
            if not isinstance(x, list):
                raise self.malformed(where, f"a malformed {tag}")
            self.value(x, where, target, depth + 1, refs)


def _hashable(v: Any) -> bool:
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        return tag in ("t", "size", "f", "e", "dtype", "device", "n") and (tag != "t" or all(
            not isinstance(i, (list, dict)) or _hashable(i) for i in x))
    return not isinstance(v, (list, dict))


def _ref(v: Any) -> Optional[str]:
    return v["n"] if isinstance(v, dict) and len(v) == 1 and "n" in v else None


def _first_ref(args: Any) -> Optional[str]:
    items = args.get("t") if isinstance(args, dict) else None
    return _ref(items[0]) if items else None


def _count(nd: Any, name: str) -> int:
    found = [0]

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if _ref(v) == name:
                found[0] += 1
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(nd.args)
    walk(nd.kwargs)
    return found[0]


_NAMED = {
    "dtype": frozenset(str(d).removeprefix("torch.") for d in vars(torch).values() if isinstance(d, torch.dtype)),
    "mf": frozenset({"contiguous_format", "channels_last", "channels_last_3d", "preserve_format"}),
    "layout": frozenset({"strided", "sparse_coo"}),
}


# -- argument rules of particular targets -------------------------------------------------------
def _rule_getattr(c: _Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 2 or kwnames or _ref(args[0]) is None or not isinstance(args[1], str):
        raise c.refuse(where, target, "getattr takes a node and a literal attribute name")
    if not attribute_allowed(args[1]):
        raise c.refuse(where, target, f"getattr of {args[1][:60]!r}, which is not an allowed attribute")


def _rule_tree_build(c: _Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 2 or kwnames or not isinstance(args[0], str) or not (isinstance(args[1], dict) and "l" in args[1]):
        raise c.refuse(where, target, "tree_build takes a spec string and a list of values")
    c.spec(args[0], where)


def _rule_run_opaque(c: _Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    ok = (len(args) in (6, 7) and not kwnames and _ref(args[0]) == MODULE_REF and isinstance(args[1], str)
          and isinstance(args[2], dict) and "l" in args[2] and isinstance(args[3], dict) and "l" in args[3]
          and all(isinstance(b, bool) for b in args[3]["l"]) and len(args[2]["l"]) == len(args[3]["l"])
          and isinstance(args[4], dict) and "l" in args[4] and all(_ref(x) for x in args[4]["l"])
          and sum(args[3]["l"]) == len(args[4]["l"])
          and isinstance(args[5], dict) and "d" in args[5]
          and all(isinstance(k, str) and valid_dotted(k) and _ref(v) for k, v in args[5]["d"])
          # the module's attributes: {name: the node reading that attribute}; patching can put
          # another value there, an artifact cannot (a parameter's alias set as an attribute
          # would let the module's own `self.x += 1` write into a weight)
          and (len(args) == 6 or (isinstance(args[6], dict) and "d" in args[6] and all(
              _attribute_name_ok(k) and c.attribute_nodes.get(_ref(v) or "") == k for k, v in args[6]["d"]))))
    if not ok:
        raise c.refuse(where, target, "run_opaque takes the module reference, a spec, constants, tensor flags, "
                       "tensors, named parameters and named attributes, as extraction writes them")
    c.spec(args[1], where)


def _attribute_name_ok(name: Any) -> bool:
    """A name an opaque graph may read and set on its module: an identifier, no dunder, none of
    nn.Module's own names (binding also checks the live module: plain data, no descriptor,
    no parameter, buffer or child, see ``functions.attribute_exposed``)."""
    from .functions import _MODULE_INTERNALS

    return isinstance(name, str) and bool(_IDENTIFIER.match(name)) and not keyword.iskeyword(name) \
        and not is_dunder(name) and name not in _MODULE_INTERNALS


def _rule_module_attribute(c: _Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 2 or kwnames or _ref(args[0]) != MODULE_REF or not _attribute_name_ok(args[1]):
        raise c.refuse(where, target, "module_attribute takes the module reference and a literal attribute name "
                       "(an identifier, no dunder, none of nn.Module's own names)")
    if args[1] in c.members.get(c.module_path, ()):
        raise c.refuse(where, target, f"{args[1]!r} is a parameter, buffer or child of the graph's module, not a "
                       "plain-data attribute")


def _rule_linear_8bit(c: _Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 4 or kwnames or _ref(args[0]) != MODULE_REF or _ref(args[1]) is None:
        raise c.refuse(where, target, "linear_8bit takes the module reference, an input, a weight and a bias")


def _rule_set_grad(c: _Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 1 or kwnames or not isinstance(args[0], bool):
        raise c.refuse(where, target, "set_grad_enabled takes one literal bool")


def _rule_restore_grad(c: _Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 1 or kwnames or _ref(args[0]) is None:
        raise c.refuse(where, target, "restore_grad_enabled takes the node that switched grad mode")


_RULES: Dict[str, Callable[..., None]] = {
    "builtins.getattr": _rule_getattr,
    "graphpatch_cache.functions.tree_build": _rule_tree_build,
    "graphpatch_cache.functions.run_opaque": _rule_run_opaque,
    "graphpatch_cache.functions.module_attribute": _rule_module_attribute,
    "graphpatch_cache.functions.linear_8bit": _rule_linear_8bit,
    "graphpatch_cache.functions.set_grad_enabled": _rule_set_grad,
    "graphpatch_cache.functions.restore_grad_enabled": _rule_restore_grad,
}
_MODULE_ATTRIBUTE = "graphpatch_cache.functions.module_attribute"
_TAKES_MODULE = frozenset({"graphpatch_cache.functions.run_opaque", "graphpatch_cache.functions.linear_8bit",
                           "graphpatch_cache.functions.module_attribute"})


# -- arity -------------------------------------------------------------------------------------
class _Sig:
    """What a call may pass: positional names (in order), keyword-only names, required names,
    and whether one list parameter accepts its elements as varargs (``x.view(2, 3)``)."""

    __slots__ = ("positional", "keyword_only", "required", "varargs_at", "var_positional", "var_keyword", "ints")

    def __init__(self, positional: List[str], keyword_only: List[str], required: Set[str],
                 varargs_at: Optional[int] = None, var_positional: bool = False, var_keyword: bool = False,
                 ints: FrozenSet[str] = frozenset()) -> None:
        self.positional, self.keyword_only, self.required = positional, keyword_only, required
        self.varargs_at, self.var_positional, self.var_keyword = varargs_at, var_positional, var_keyword
        self.ints = ints  # parameters torch parses as integers (sizes, dims; also dtypes): no float or str


def _kind(v: Any) -> str:
    """``"x"`` for a literal that no integer parameter takes (a float, complex or string, or a
    list holding one), ``"."`` for anything else (ints, nodes, dtypes, None...)."""
    if isinstance(v, str):
        return "x"
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag in ("f", "c"):
            return "x"
        if tag in ("t", "l", "size") and isinstance(x, list) and any(_kind(i) == "x" for i in x):
            return "x"
    return "."


def _fits(sig: _Sig, kinds: Tuple[str, ...], kwkinds: Tuple[Tuple[str, str], ...]) -> bool:
    nargs = len(kinds)
    if nargs <= len(sig.positional):
        given = list(zip(sig.positional, kinds))
    elif sig.var_positional or sig.varargs_at is not None:
        # the extra positionals are the list's elements (or *args)
        given = list(zip(sig.positional, kinds))
        if sig.varargs_at is not None and sig.positional[sig.varargs_at] in sig.ints and "x" in kinds[len(sig.positional):]:
            return False
    else:
        return False
    names = set(sig.positional) | set(sig.keyword_only)
    taken = {name for name, _ in given}
    for k, kind in kwkinds:
        if k in taken or (k not in names and not sig.var_keyword):
            return False
    if any(kind == "x" and name in sig.ints for name, kind in given + list(kwkinds)):
        return False
    return sig.required <= taken | {k for k, _ in kwkinds}


_SIGS: Dict[Tuple[str, str], Optional[List[_Sig]]] = {}


def _from_schema(schema: Any) -> _Sig:
    positional, keyword_only, required, ints = [], [], set(), set()
    varargs_at = None
    for arg in schema.arguments:
        (keyword_only if arg.kwarg_only else positional).append(arg.name)
        if not arg.has_default_value() and not str(arg.type).startswith("Optional") and not str(arg.type).endswith("?"):
            required.add(arg.name)
        type_text = str(arg.type)
        if varargs_at is None and not arg.kwarg_only and (type_text.endswith("[]") or type_text.startswith("List[")):
            varargs_at = len(positional) - 1
        if type_text in _INT_TYPES:
            ints.add(arg.name)
    # Python's argument parser lets the last positional int list take varargs
    if varargs_at is not None and varargs_at != len(positional) - 1:
        varargs_at = None
    return _Sig(positional, keyword_only, required, varargs_at, ints=frozenset(ints))


_INT_TYPES = frozenset({"int", "SymInt", "Optional[int]", "List[int]", "Optional[List[int]]", "int[]", "SymInt[]",
                        "int?", "SymInt?", "int[]?", "SymInt[]?"})


def _from_inspect(sig: inspect.Signature) -> _Sig:
    positional, keyword_only, required = [], [], set()
    var_positional = var_keyword = False
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
        elif p.kind == p.KEYWORD_ONLY:
            keyword_only.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            var_positional = True
        else:
            var_keyword = True
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            required.add(p.name)
    return _Sig(positional, keyword_only, required, None, var_positional, var_keyword)


def _aten_schemas(name: str) -> List[_Sig]:
    # ".out" overloads take out=, which is refused anyway
    return [_from_schema(s) for s in _schemas_for(name) if not s.overload_name.endswith("out")]


def _method_signatures(name: str) -> Optional[List[_Sig]]:
    key = ("method", name)
    if key not in _SIGS:
        sigs = _aten_schemas(name)
        _SIGS[key] = sigs or None
    return _SIGS[key]


def _function_signatures(name: str, fn: Any) -> Optional[List[_Sig]]:
    key = ("function", name)
    if key in _SIGS:
        return _SIGS[key]
    sigs: Optional[List[_Sig]] = None
    if isinstance(fn, torch._ops.OpOverload):
        sigs = [_from_schema(fn._schema)]
    elif isinstance(fn, torch._ops.OpOverloadPacket):
        sigs = [_from_schema(getattr(fn, o)._schema) for o in fn.overloads()]
    else:
        try:
            sigs = [_from_inspect(inspect.signature(fn))]
        except (TypeError, ValueError):
            builtin = _aten_name(fn)
            sigs = _aten_schemas(builtin) if builtin else None
            sigs = sigs or None
    _SIGS[key] = sigs
    return sigs


# -- writes and aliasing (shared with runtime/guards.py) ------------------------------------
_INPLACE_OPERATORS = frozenset({"_operator.iadd", "_operator.isub", "_operator.imul", "_operator.itruediv",
                                "_operator.ifloordiv", "_operator.imod", "_operator.ipow", "_operator.iand",
                                "_operator.ior", "_operator.ixor", "_operator.ilshift", "_operator.irshift",
                                "_operator.imatmul", "_operator.setitem"})
#: ops that return (part of) their input: their results may alias a parameter
_ALIASING_FUNCTIONS = frozenset({"_operator.getitem", "builtins.getattr", "graphpatch_cache.functions.tree_build"})


def _schemas_for(name: str) -> List[Any]:
    return list(torch._C._jit_get_schemas_for_operator(f"aten::{name}"))


def _aten_name(fn: Any) -> Optional[str]:
    try:
        from torch.jit._builtins import _find_builtin
    except ImportError:  # pragma: no cover - other torch versions
        return None
    found = _find_builtin(fn)
    return found.split("::", 1)[1] if isinstance(found, str) and found.startswith("aten::") else None


_OP_SCHEMAS: Dict[Tuple[str, str], Optional[List[Any]]] = {}
_ALIASES: Dict[Tuple[str, str], bool] = {}


def _op_schemas(op: str, name: str, fn: Any) -> Optional[List[Any]]:
    """Torch schemas of a node's target, or None when none are known (a Python function)."""
    key = (op, name)
    if key not in _OP_SCHEMAS:
        _OP_SCHEMAS[key] = _find_op_schemas(op, name, fn)
    return _OP_SCHEMAS[key]


def _find_op_schemas(op: str, name: str, fn: Any) -> Optional[List[Any]]:
    if op == "call_method":
        return _schemas_for(name) or None
    if isinstance(fn, torch._ops.OpOverload):
        return [fn._schema]
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return [getattr(fn, o)._schema for o in fn.overloads()]
    aten = _aten_name(fn)
    return (_schemas_for(aten) or None) if aten else None


def may_alias_input(op: str, name: str, fn: Any) -> bool:
    """Whether the node's result may share storage with one of its inputs."""
    key = (op, name)
    if key not in _ALIASES:
        _ALIASES[key] = _may_alias_input(op, name, fn)
    return _ALIASES[key]


def _may_alias_input(op: str, name: str, fn: Any) -> bool:
    if op == "call_function" and name in _ALIASING_FUNCTIONS:
        return True
    if op == "call_function" and name.startswith(("_operator.", "math.", "builtins.")):
        return False  # arithmetic creates new values; getitem/getattr are listed above
    schemas = _op_schemas(op, name, fn)
    if schemas is None:
        return True  # unknown: assume it may (x.float() returns x itself when already float)
    return any(ret.alias_info is not None for s in schemas for ret in s.returns)


def written_inputs(op: str, name: str, fn: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> List[Any]:
    """The argument values a node writes into (the fx nodes among them matter)."""
    out: List[Any] = []
    if op == "call_method":
        if name.endswith("_") and not name.startswith("_") and args:
            out.append(args[0])
        return out
    if op != "call_function":
        return out
    short = name.rsplit(".", 1)[-1]
    if name in _INPLACE_OPERATORS or (short.endswith("_") and not short.startswith("_")):
        if args:
            out.append(args[0])
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        for schema in _op_schemas(op, name, fn) or []:
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    if arg.kwarg_only and arg.name in kwargs:
                        out.append(kwargs[arg.name])
                    elif not arg.kwarg_only and i < len(args):
                        out.append(args[i])
    inplace = kwargs.get("inplace", _positional(fn, "inplace", args))
    if inplace is not None and inplace is not False:
        out.append(args[0] if args else kwargs.get("input"))
    if name == "torch.nn.functional.embedding":
        max_norm = kwargs.get("max_norm", _positional(fn, "max_norm", args))
        if max_norm is not None:  # renormalizes the weight rows it reads, in place
            out.append(kwargs.get("weight", args[1] if len(args) > 1 else None))
    return out


_PARAM_NAMES: Dict[Any, List[str]] = {}


def _positional(fn: Any, param: str, args: Sequence[Any]) -> Any:
    """The value passed positionally for ``param`` of a Python function (None if not)."""
    if fn is None or not args:
        return None
    try:
        names = _PARAM_NAMES.get(fn)
    except TypeError:  # unhashable
        return None
    if names is None:
        try:
            names = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            names = []
        _PARAM_NAMES[fn] = names
    return args[names.index(param)] if param in names and names.index(param) < len(args) else None



__all__ = ["MAX_NODES", "check_artifact", "may_alias_input", "read_artifact", "read_portable", "written_inputs"]
