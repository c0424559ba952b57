"""Hostile artifacts for the loader's trust boundary (issue 9), and the three doors they come in by.

Everything here starts from a *real* artifact: :func:`legit_setup` extracts a tiny model
(:class:`Tiny`: a block of LayerNorm -> Linear -> GELU -> Linear with a residual, then a
Linear head) once through ``load_cached``, so the template cache root holds a genuine entry.
Attacks (``tests/test_attacks.py``) and the fuzz mutator (:class:`Mutator`) edit a deep copy
of that artifact's JSON form, so every hostile artifact is well-formed where the attack does
not say otherwise: it matches the JSON Schema and is delivered with correct sha256 digests.

The doors, as an attacker with write access to a shared root (or a mail attachment) uses them:

* :func:`deliver_cache`: a blob + ref planted in a copy of the template root (the ref's
  ``digest``/``size`` point at the new blob, every other ref field is kept), then
  ``load_cached`` with a fresh local tier, so the hostile blob is what is read.
* :func:`deliver_portable`: ``PatchableGraph.load`` on a portable file written by the
  library's own :func:`graphpatch_cache.artifact.portable_to_bytes` (see
  :func:`portable_bytes`; :func:`mirror_portable_bytes` is the one hand-written copy of the
  format, for payloads that the library cannot serialize, such as 100,000-deep nesting).
* :func:`deliver_cli`: ``graphpatch-cache import FILE --key KEY`` in-process (click's
  CliRunner) into a copy of the template root, then ``load_cached`` on that root.

Payloads write a marker file (or delete a victim directory) in the test's own directory;
:meth:`Ctx.harm` is the independent oracle of whether any of them ran.

The fuzzer (:func:`fuzz`, used by ``tests/test_fuzz.py`` and ``scripts/fuzz_loader.py``) uses
the fastest door, a cache blob's bytes through ``read_artifact`` + ``from_artifact``
(:func:`load_blob`), and classifies every case (:data:`OUTCOMES`, :data:`FLAGS`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import string
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

# ------------------------------------------------------------------------------------------
# The victim model


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class Tiny(nn.Module):
    """No seeding in ``__init__``: re-running it (an attack) must visibly change the weights."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.block = Block(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.block(x))


def make_model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def example_inputs() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 3, 8, generator=g)}


@dataclass
class Legit:
    """The genuine artifact and the cache root it lives in (never modified by a test)."""

    model: Tiny
    inputs: Dict[str, torch.Tensor]
    expected: torch.Tensor
    artifact: Dict[str, Any]
    key: str
    root: Path
    ref_name: str
    provenance: Optional[List[Any]]  # what `graphpatch-cache export` writes beside the artifacts (None: nothing)
    exported: bytes  # the key exported by `graphpatch-cache export` from the template root

    def fresh_model(self) -> Tiny:
        return copy.deepcopy(self.model)

    def fresh_artifact(self) -> Dict[str, Any]:
        return copy.deepcopy(self.artifact)


def legit_setup(workdir: Path) -> Legit:
    """Extract :class:`Tiny` once through ``load_cached`` into ``workdir/template-root``."""
    from graphpatch_cache import CacheStore, load_cached

    workdir = Path(workdir)
    model = make_model()
    inputs = example_inputs()
    root = workdir / "template-root"
    pg = load_cached(model, store=CacheStore(root, local_dir=workdir / "template-local"), **inputs)
    assert pg.cache_stats.misses == 1, pg.cache_stats
    key = pg.cache_stats.keys[0]
    refs = sorted((root / "refs" / key).glob("*.json"))
    assert len(refs) == 1, refs
    with torch.no_grad():
        expected = model(**inputs)
    artifact = pg.artifact.to_dict()
    # the entry really is served to a second process-like reader (fresh local tier)
    again = load_cached(model, store=CacheStore(root, local_dir=workdir / "template-local-2"), **inputs)
    assert again.cache_stats.hits == 1, again.cache_stats
    # what a teammate's `graphpatch-cache export KEY` of this entry looks like
    from click.testing import CliRunner

    from graphpatch_cache.cli.main import cli

    exported_path = workdir / "exported.json"
    result = CliRunner(env={"GRAPHPATCH_CACHE_LOCAL_DIR": str(workdir / "template-local-3")}).invoke(
        cli, ["export", key, "-o", str(exported_path), "--cache-dir", str(root)])
    assert result.exit_code == 0, result.output
    exported = exported_path.read_bytes()
    return Legit(model=model, inputs=inputs, expected=expected, artifact=artifact, key=key, root=root,
                 ref_name=refs[0].name, provenance=json.loads(exported).get("provenance"), exported=exported)


# ------------------------------------------------------------------------------------------
# Per-case context: where payloads aim, and the oracle of whether one ran


@dataclass
class Ctx:
    """One case's directory. ``marker`` must never exist, ``victim`` must never vanish."""

    dir: Path
    raw: Dict[str, str] = field(default_factory=dict)  # sentinel string -> raw JSON text

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.victim.mkdir(exist_ok=True)
        (self.victim / "keep.txt").write_text("do not delete")
        self.site.mkdir(exist_ok=True)

    @property
    def marker(self) -> str:
        return str(self.dir / "MARKER")

    @property
    def cmd(self) -> str:
        """A shell command that creates the marker."""
        return f"touch {shlex.quote(self.marker)}"

    @property
    def victim(self) -> Path:
        return self.dir / "victim"

    @property
    def site(self) -> Path:
        """A directory the test puts on ``sys.path`` (a planted package lives here)."""
        return self.dir / "site"

    def splice(self, text: str) -> str:
        """A placeholder string that :func:`artifact_bytes` replaces by raw JSON ``text``."""
        sentinel = f"@@RAW{len(self.raw)}-{uuid.uuid4().hex}@@"
        self.raw[sentinel] = text
        return sentinel

    def reset(self) -> None:
        """Undo what a payload did, so the next fuzz case is judged on its own."""
        with contextlib.suppress(OSError):
            os.unlink(self.marker)
        self.victim.mkdir(exist_ok=True)
        (self.victim / "keep.txt").write_text("do not delete")

    def harm(self) -> List[str]:
        """What payloads did (empty: nothing)."""
        out = []
        if os.path.lexists(self.marker):
            out.append(f"payload marker {self.marker} exists")
        if not (self.victim / "keep.txt").exists():
            out.append(f"victim directory {self.victim} was deleted")
        return out


# ------------------------------------------------------------------------------------------
# Encoding helpers (the artifact's value codec, written by hand)


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Fn:
    """A callable named by an ``fn`` tag."""

    name: str


@dataclass(frozen=True)
class Tag:
    """An already encoded value (``{"device": ...}``, a raw splice, anything odd)."""

    value: Any


def F(x: float) -> Tag:
    return Tag({"f": float(x).hex()})


def enc(v: Any) -> Any:
    if isinstance(v, Ref):
        return {"n": v.name}
    if isinstance(v, Fn):
        return {"fn": v.name}
    if isinstance(v, Tag):
        return v.value
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return {"f": v.hex()}
    if isinstance(v, tuple):
        return {"t": [enc(x) for x in v]}
    if isinstance(v, list):
        return {"l": [enc(x) for x in v]}
    if isinstance(v, dict):
        return {"d": [[enc(k), enc(x)] for k, x in v.items()]}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    raise TypeError(f"cannot encode {v!r}")


def node(name: str, op: str, target: str, args: tuple = (), kwargs: Optional[dict] = None) -> Dict[str, Any]:
    return {"name": name, "op": op, "target": target, "args": enc(tuple(args)), "kwargs": enc(dict(kwargs or {})),
            "meta": {}}


def graph_at(art: Dict[str, Any], module_path: str = "") -> Dict[str, Any]:
    """The module graph (dict) of ``module_path`` in an artifact dict."""
    stack = [art["root"]]
    while stack:
        g = stack.pop()
        if g["module_path"] == module_path:
            return g
        stack.extend(g["children"])
    raise KeyError(module_path)


def find_node(graph: Dict[str, Any], name: str) -> Dict[str, Any]:
    for nd in graph["nodes"]:
        if nd["name"] == name:
            return nd
    raise KeyError(name)


class Payload:
    """Appends nodes to one graph, just before its output node (the graph's real result is
    already computed, so a payload that runs leaves the output as it was: nobody notices)."""

    def __init__(self, art: Dict[str, Any], module_path: str = "") -> None:
        self.graph = graph_at(art, module_path)
        self.nodes: List[Dict[str, Any]] = []
        out = [i for i, nd in enumerate(self.graph["nodes"]) if nd["op"] == "output"]
        self._at = out[-1] if out else len(self.graph["nodes"])

    def _add(self, nd: Dict[str, Any]) -> Ref:
        self.graph["nodes"].insert(self._at + len(self.nodes), nd)
        self.nodes.append(nd)
        return Ref(nd["name"])

    def call(self, name: str, target: str, *args: Any, **kwargs: Any) -> Ref:
        return self._add(node(name, "call_function", target, args, kwargs))

    def method(self, name: str, target: str, *args: Any, **kwargs: Any) -> Ref:
        return self._add(node(name, "call_method", target, args, kwargs))

    def get_attr(self, name: str, target: str) -> Ref:
        return self._add(node(name, "get_attr", target))

    # -- the usual ways of reaching os.system (other cases' primitives) --------------------
    def globals_via_attrgetter(self, x: Ref, p: str = "ag") -> Ref:
        getter = self.call(f"{p}_getter", "operator.attrgetter", "backward.__func__.__globals__")
        return self.call(f"{p}_globals", "operator.call", getter, x)

    def os_via_attrgetter(self, x: Ref, p: str = "ag") -> Ref:
        """``x.backward.__func__.__globals__["torch"].os`` (torch imports os)."""
        glob = self.globals_via_attrgetter(x, p)
        torch_mod = self.call(f"{p}_torch", "operator.getitem", glob, "torch")
        return self.call(f"{p}_os", "builtins.getattr", torch_mod, "os")

    def os_via_computed_getattr(self, x: Ref, p: str = "cg") -> Ref:
        """``getattr`` with dunder names computed at run time (``"__fu" + "nc__"``)."""
        bound = self.call(f"{p}_bound", "builtins.getattr", x, "backward")
        func_name = self.call(f"{p}_n1", "_operator.add", "__fu", "nc__")
        func = self.call(f"{p}_func", "builtins.getattr", bound, func_name)
        glob_name = self.call(f"{p}_n2", "_operator.add", "__glo", "bals__")
        glob = self.call(f"{p}_glob", "builtins.getattr", func, glob_name)
        torch_mod = self.call(f"{p}_torch", "operator.getitem", glob, "torch")
        return self.call(f"{p}_os", "builtins.getattr", torch_mod, "os")

    def system_via_computed_getattr(self, x: Ref, p: str = "cg") -> Ref:
        return self.call(f"{p}_system", "builtins.getattr", self.os_via_computed_getattr(x, p), "system")

    def disable_grad(self, p: str = "ng") -> Ref:
        return self.call(f"{p}_prev", "graphpatch_cache.functions.set_grad_enabled", False)

    def restore_grad(self, prev: Ref, p: str = "ng") -> Ref:
        return self.call(f"{p}_restore", "graphpatch_cache.functions.restore_grad_enabled", prev)


# ------------------------------------------------------------------------------------------
# Bytes


def dumps(obj: Any) -> str:
    """Deterministic JSON (the library's own convention; NaN allowed so attacks can use it)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _splice(text: str, raw: Dict[str, str]) -> str:
    for sentinel, replacement in raw.items():
        quoted = json.dumps(sentinel)
        assert quoted in text, f"splice {sentinel} not found"
        text = text.replace(quoted, replacement)
    return text


def artifact_bytes(art: Dict[str, Any], raw: Optional[Dict[str, str]] = None) -> bytes:
    """A cache blob: the artifact dict as deterministic JSON, raw splices applied."""
    return _splice(dumps(art), raw or {}).encode()


def mirror_portable_bytes(artifact_texts: List[bytes], key: Optional[str] = None,
                          provenance: Optional[List[Any]] = None) -> bytes:
    """The portable format written by hand: the ONE copy of it in the tests (kept in step
    with ``graphpatch_cache.artifact.portable_to_bytes``), for artifacts the library cannot
    serialize (100,000-deep nesting, NaN, invalid UTF-8)."""
    items = b"[" + b",".join(artifact_texts) + b"]"
    out = b'{"artifacts":' + items + b',"format":"graphpatch-cache-portable"'
    if key is not None:
        out += b',"key":' + json.dumps(key).encode()
    if provenance is not None:
        out += b',"provenance":' + dumps(provenance).encode()
    # the sha256 of the artifacts list as canonical JSON, as an attacker recomputes it
    digest = hashlib.sha256(items).hexdigest()
    return out + b',"sha256":"' + digest.encode() + b'"}'


class _AsArtifact:
    """Stands in for a GraphArtifact when ``from_dict`` refuses the hostile dict itself."""

    def __init__(self, data: Dict[str, Any]) -> None:
        self._data = data

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(self._data)

    def to_json(self) -> str:
        return json.dumps(self._data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def portable_bytes(art: Dict[str, Any], raw: Optional[Dict[str, str]] = None, key: Optional[str] = None,
                   provenance: Optional[List[Any]] = None) -> Tuple[bytes, str]:
    """A portable file holding exactly ``art`` (with ``key`` and ``provenance`` as ``export``
    writes them, when given); returns ``(bytes, how)``.

    Written by the library's ``portable_to_bytes`` (from ``GraphArtifact.from_dict``, else a
    duck-typed stand-in), checked to carry ``art`` unchanged; only raw splices, NaN or a
    refusal of both routes fall back to :func:`mirror_portable_bytes`.
    """
    from graphpatch_cache.artifact import GraphArtifact, portable_to_bytes

    extra = {"provenance": provenance} if provenance is not None else {}
    if not raw:
        for how, make in (("library", lambda: GraphArtifact.from_dict(copy.deepcopy(art))),
                          ("library-standin", lambda: _AsArtifact(art))):
            try:
                data = portable_to_bytes([make()], key=key, **extra)
                if json.loads(data)["artifacts"] == [art]:
                    return data, how
            except Exception:
                continue
    return mirror_portable_bytes([artifact_bytes(art, raw)], key=key, provenance=provenance), "mirror"


# ------------------------------------------------------------------------------------------
# Doors


def _tree(root: Path) -> Dict[str, bytes]:
    """Refs (with content) and blob names under a cache root: what 'stored something' means."""
    out: Dict[str, bytes] = {}
    for sub in ("refs", "objects"):
        base = root / sub
        if base.is_dir():
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    out[str(p.relative_to(root))] = p.read_bytes() if sub == "refs" else b""
    return out


def plant_in_cache(legit: Legit, data: bytes, root: Path) -> Path:
    """Copy the template root to ``root`` and point its ref at a new blob holding ``data``."""
    shutil.copytree(legit.root, root)
    digest = hashlib.sha256(data).hexdigest()
    blob = root / "objects" / digest[:2] / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    ref = root / "refs" / legit.key / legit.ref_name
    meta = json.loads(ref.read_bytes())
    meta["digest"] = digest
    meta["size"] = len(data)
    ref.write_text(json.dumps(meta, sort_keys=True))
    return root


def deliver_cache(legit: Legit, model: nn.Module, data: bytes, workdir: Path) -> Any:
    """Plant ``data`` as the key's blob, then ``load_cached`` as a teammate would (new local tier)."""
    from graphpatch_cache import CacheStore, load_cached

    root = plant_in_cache(legit, data, Path(workdir) / "root")
    return load_cached(model, store=CacheStore(root, local_dir=Path(workdir) / "local-victim"), **legit.inputs)


def plant_in_remote(legit: Legit, data: bytes, url: str) -> None:
    """The same planting under an fsspec URL (``memory://...``, ``s3://bucket/prefix``): the
    template root's files copied there, the key's ref pointed at a new blob holding ``data``."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(url)
    root = Path(legit.root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fs.pipe_file(f"{base}/{path.relative_to(root).as_posix()}", path.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    fs.pipe_file(f"{base}/objects/{digest[:2]}/{digest}", data)
    ref = f"{base}/refs/{legit.key}/{legit.ref_name}"
    meta = json.loads(fs.cat_file(ref))
    meta["digest"] = digest
    meta["size"] = len(data)
    fs.pipe_file(ref, json.dumps(meta, sort_keys=True).encode())


def deliver_remote(legit: Legit, model: nn.Module, data: bytes, url: str, workdir: Path) -> Any:
    """Plant ``data`` on an object-storage root, then ``load_cached`` from it as a teammate
    would (a new local tier in front)."""
    from graphpatch_cache import CacheStore, load_cached

    plant_in_remote(legit, data, url)
    return load_cached(model, store=CacheStore(url, local_dir=Path(workdir) / "local-victim"), **legit.inputs)


def deliver_portable(legit: Legit, model: nn.Module, data: bytes, workdir: Path) -> Any:
    from graphpatch_cache import PatchableGraph

    Path(workdir).mkdir(parents=True, exist_ok=True)
    path = Path(workdir) / "graphs.json"
    path.write_bytes(data)
    return PatchableGraph.load(path, model)


@dataclass
class CliOutcome:
    exit_code: int
    output: str
    stored: bool  # refs or blobs under the root changed
    root: Path


def deliver_cli(legit: Legit, data: bytes, workdir: Path) -> CliOutcome:
    """``graphpatch-cache import FILE --key KEY --cache-dir ROOT`` in-process, into a copy of
    the template root (the key is already there, as on a shared root)."""
    from click.testing import CliRunner

    from graphpatch_cache.cli.main import cli

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "root"
    shutil.copytree(legit.root, root)
    before = _tree(root)
    path = workdir / "graphs.json"
    path.write_bytes(data)
    runner = CliRunner(env={"GRAPHPATCH_CACHE_LOCAL_DIR": str(workdir / "local-importer")})
    result = runner.invoke(cli, ["import", str(path), "--key", legit.key, "--cache-dir", str(root)])
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += f"\n[uncaught {type(result.exception).__name__}: {result.exception}]"
    return CliOutcome(exit_code=result.exit_code, output=output, stored=_tree(root) != before, root=root)


# ------------------------------------------------------------------------------------------
# Oracles: the model and the process


def snapshot_model(model: nn.Module) -> Dict[str, Any]:
    """Values, shapes, requires_grad and .grad of every parameter and buffer."""
    snap: Dict[str, Any] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        snap[name] = (t.detach().clone(), t.requires_grad, None if t.grad is None else t.grad.clone())
    return snap


def model_changes(model: nn.Module, snap: Dict[str, Any]) -> List[str]:
    now = dict(list(model.named_parameters()) + list(model.named_buffers()))
    out = []
    if set(now) != set(snap):
        out.append(f"parameter names changed: {sorted(set(now) ^ set(snap))}")
    for name, (value, requires_grad, grad) in snap.items():
        t = now.get(name)
        if t is None:
            continue
        if t.shape != value.shape or t.dtype != value.dtype or not torch.equal(t.detach(), value):
            out.append(f"{name} changed")
        if t.requires_grad != requires_grad:
            out.append(f"{name}.requires_grad changed")
        if (t.grad is None) != (grad is None) or (grad is not None and not torch.equal(t.grad, grad)):
            out.append(f"{name}.grad changed")
    return out


def global_state() -> Dict[str, Any]:
    state = {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "autocast_cpu_dtype": torch.get_autocast_dtype("cpu"),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "num_threads": torch.get_num_threads(),
    }
    get_default_device = getattr(torch, "get_default_device", None)
    if get_default_device is not None:
        state["default_device"] = str(get_default_device())
    return state


def restore_global_state(state: Dict[str, Any]) -> None:
    """Put back whatever differs from ``state`` (so a payload that ran spoils no later test)."""
    now = global_state()
    setters = {
        "grad_enabled": torch._C._set_grad_enabled,
        "default_dtype": torch.set_default_dtype,
        "autocast_cpu": lambda v: torch.set_autocast_enabled("cpu", v),
        "autocast_cpu_dtype": lambda v: torch.set_autocast_dtype("cpu", v),
        "matmul_precision": torch.set_float32_matmul_precision,
        "deterministic": torch.use_deterministic_algorithms,
        "anomaly": torch.set_anomaly_enabled,
        "num_threads": torch.set_num_threads,
        # "cpu" is also what an unset default device reads as: unset it rather than install
        # a device mode that the rest of the session would run under
        "default_device": lambda v: torch.set_default_device(None if v == "cpu" else v),
    }
    for name, value in state.items():
        if now.get(name) != value and name in setters:
            setters[name](value)


def state_changes(before: Dict[str, Any], after: Dict[str, Any]) -> List[str]:
    return [f"{k}: {before[k]!r} -> {after.get(k)!r}" for k in before if before[k] != after.get(k)]


# ------------------------------------------------------------------------------------------
# Fuzzing: a seeded mutator over the artifact's JSON

#: call targets a mutation may swap in: real ones, allowlist-ish ones, and hostile ones
TARGET_POOL = [
    "torch.nn.functional.linear", "torch.nn.functional.gelu", "torch.nn.functional.layer_norm", "_operator.add",
    "operator.getitem", "operator.mul", "torch.add", "torch.matmul", "torch.zeros", "torch.ones", "torch.cat",
    "builtins.getattr", "builtins.max", "builtins.min", "builtins.len", "builtins.range", "builtins.dict",
    "builtins.eval", "builtins.exec", "builtins.__import__", "builtins.open", "os.system", "subprocess.run",
    "operator.attrgetter", "operator.methodcaller", "operator.itemgetter", "operator.call", "operator.setitem",
    "torch.ops.aten.add.Tensor", "torch.ops.aten.view.default", "torch.ops.aten.from_file.default",
    "torch.ops.aten.copy_.default", "torch.ops.aten.set_.source_Tensor", "torch.ops.higher_order.cond",
    "torch.UntypedStorage", "torch.FloatStorage", "torch.load", "torch.save", "torch.from_file",
    "torch._C._set_grad_enabled", "graphpatch_cache.functions.set_grad_enabled",
    "graphpatch_cache.functions.tree_build", "graphpatch_cache.functions.live_attr",
    "graphpatch_cache.functions.run_opaque", "graphpatch_cache.functions.forward_only",
    "torch.ops.higher_order.autograd_function_apply", "torch.set_default_dtype", "torch.set_autocast_enabled",
    "math.sqrt", "math.floor", "", ".", "torch..add", "__import__", "torch.__class__",
]
METHOD_POOL = [
    "view", "reshape", "contiguous", "transpose", "size", "add", "mul", "zero_", "copy_", "add_", "fill_",
    "apply_", "map_", "set_", "storage", "untyped_storage", "register_hook", "backward", "__reduce_ex__",
    "__class__", "__setattr__", "__getitem__", "requires_grad_", "resize_", "to", "float", "", "__init__",
]
STRING_POOL = [
    "", "x", "weight", "bias", "__class__", "__dict__", "__globals__", "__builtins__", "__import__", "os",
    "system", "backward", "..", "block..fc1", "head.load_state_dict", "__init__", "import", "class", "lambda",
    "self", "torch", "operator", "x; import os", "\u0000", "\udcff", "é", "a" * 300, "dyn", "nan",
    "cuda:99999999999", "file:///etc", "meta; rm", "float32", "cpu", "meta", "n", "t", "l", "d", "f", "fn",
]
TAGS = ["n", "f", "t", "l", "d", "s", "e", "size", "dtype", "device", "mf", "layout", "c", "fn", "zz", ""]


class Mutator:
    """Seeded mutations of a valid artifact. ``mutate(seed)`` returns ``(data, description)``:
    the bytes of a cache blob (possibly no longer JSON) and what was done, so a failing case
    can be reproduced from its seed alone."""

    def __init__(self, artifact: Dict[str, Any], ctx_strings: List[str] = ()) -> None:
        self.artifact = artifact
        self.strings = STRING_POOL + list(ctx_strings)

    # -- random JSON ---------------------------------------------------------------------
    def rand_str(self, r: random.Random) -> str:
        if r.random() < 0.7:
            return r.choice(self.strings + TARGET_POOL + METHOD_POOL)
        return "".join(r.choice(string.printable) for _ in range(r.randint(0, 12)))

    def rand_int(self, r: random.Random) -> int:
        return r.choice([0, 1, -1, 2, 7, 8, 16, 2**40, 2**63, 2**70, -(2**63) - 1, 10**400, r.randint(-1000, 1000)])

    def rand_value(self, r: random.Random, depth: int = 0) -> Any:
        kind = r.randrange(10 if depth < 4 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return r.choice([True, False])
        if kind == 2:
            return self.rand_int(r)
        if kind == 3:
            return r.choice([0.5, -1.0, 1e308, 1e-320, 3.0])
        if kind == 4:
            return self.rand_str(r)
        if kind == 5:
            return [self.rand_value(r, depth + 1) for _ in range(r.randint(0, 4))]
        if kind == 6:
            return {self.rand_str(r): self.rand_value(r, depth + 1) for _ in range(r.randint(0, 3))}
        if kind == 7:  # an encoded value with a random (or real) tag
            tag = r.choice(TAGS)
            return {tag: self.rand_value(r, depth + 1)}
        if kind == 8:
            return {"n": self.rand_str(r)}
        return {"fn": r.choice(TARGET_POOL)}

    # -- walking ----------------------------------------------------------------------------
    @staticmethod
    def graphs(art: Dict[str, Any]) -> List[Dict[str, Any]]:
        out, stack = [], [art["root"]]
        while stack:
            g = stack.pop()
            out.append(g)
            stack.extend(g["children"])
        return out

    @staticmethod
    def slots(obj: Any, path: Tuple = ()) -> Iterator[Tuple[Tuple, Any]]:
        """Every (path, value) inside ``obj``."""
        yield path, obj
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from Mutator.slots(v, path + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                yield from Mutator.slots(v, path + (i,))

    @staticmethod
    def set_at(obj: Any, path: Tuple, value: Any) -> None:
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value

    @staticmethod
    def delete_at(obj: Any, path: Tuple) -> None:
        for p in path[:-1]:
            obj = obj[p]
        del obj[path[-1]]

    # -- mutations ---------------------------------------------------------------------------
    def mutate(self, seed: int) -> Tuple[bytes, str]:
        r = random.Random(seed)
        art = copy.deepcopy(self.artifact)
        steps = []
        text_level = None
        for _ in range(r.choice([1, 1, 1, 2, 3])):
            kind = r.randrange(18)
            if kind == 17:
                text_level = r.randrange(4)
                continue
            try:
                steps.append(self._mutate_once(r, art, kind))
            except (KeyError, TypeError, IndexError, AttributeError, ValueError):
                steps.append(f"mutation {kind} skipped (an earlier step broke its target)")
        text = dumps(art)
        data = text.encode()
        if text_level is not None:
            data, what = self._mutate_bytes(r, data, text_level)
            steps.append(what)
        return data, f"seed={seed}: " + "; ".join(steps)

    def _mutate_bytes(self, r: random.Random, data: bytes, level: int) -> Tuple[bytes, str]:
        i = r.randrange(len(data))
        if level == 0:
            return data[:i], f"truncate bytes at {i}"
        if level == 1:
            bit = 1 << r.randrange(8)
            return data[:i] + bytes([data[i] ^ bit]) + data[i + 1:], f"flip bit {bit} of byte {i}"
        if level == 2:
            return data[:i] + data[i + 1:], f"delete byte {i}"
        junk = r.choice([b"{", b"]", b'"', b",", b"\xff", b"NaN", b"1e999", b"\\u0000"])
        return data[:i] + junk + data[i:], f"insert {junk!r} at byte {i}"

    def _mutate_once(self, r: random.Random, art: Dict[str, Any], kind: int) -> str:
        graphs = self.graphs(art)
        g = r.choice(graphs)
        where = g["module_path"] or "<root>"
        nodes = g["nodes"]
        if kind == 0 and nodes:  # delete a node
            nd = nodes.pop(r.randrange(len(nodes)))
            return f"delete node {nd['name']} in {where}"
        if kind == 1 and nodes:  # duplicate a node (same name or renamed)
            i = r.randrange(len(nodes))
            dup = copy.deepcopy(nodes[i])
            if r.random() < 0.5:
                dup["name"] = f"{dup['name']}_dup"
            nodes.insert(r.randrange(len(nodes) + 1), dup)
            return f"duplicate node {nodes[i]['name']} in {where}"
        if kind == 2 and nodes:  # swap a call target
            nd = r.choice(nodes)
            old = nd["target"]
            nd["target"] = r.choice(TARGET_POOL) if nd["op"] != "call_method" else r.choice(METHOD_POOL)
            if r.random() < 0.2:
                nd["target"] = self.rand_str(r)
            return f"target of {nd['name']} in {where}: {old!r} -> {nd['target']!r}"
        if kind == 3 and nodes:  # change op kind
            nd = r.choice(nodes)
            old = nd["op"]
            nd["op"] = r.choice(["placeholder", "get_attr", "call_function", "call_method", "call_module", "output",
                                 "call", "exec"])
            return f"op of {nd['name']} in {where}: {old} -> {nd['op']}"
        if kind == 4:  # break a reference
            refs = [(p, v) for p, v in self.slots(g["nodes"]) if isinstance(v, dict) and "n" in v and len(v) == 1]
            if refs:
                p, v = r.choice(refs)
                old = v["n"]
                names = [nd["name"] for nd in nodes if isinstance(nd, dict) and isinstance(nd.get("name"), str)]
                new = r.choice([self.rand_str(r), "nope", "output"] + names)
                self.set_at(g["nodes"], p + ("n",), new)
                return f"reference {old!r} -> {new!r} in {where}"
        if kind == 5:  # change a tag
            tagged = [(p, v) for p, v in self.slots(g["nodes"]) if isinstance(v, dict) and len(v) == 1
                      and next(iter(v)) in TAGS]
            if tagged:
                p, v = r.choice(tagged)
                (tag, inner), = v.items()
                new = r.choice(TAGS)
                self.set_at(g["nodes"], p, {new: inner})
                return f"tag {tag!r} -> {new!r} in {where}"
        if kind in (6, 7):  # replace any value (anywhere in the artifact) by random JSON
            slots = [p for p, _ in self.slots(art) if p]
            p = r.choice(slots)
            value = self.rand_value(r)
            self.set_at(art, p, value)
            return f"set {'/'.join(map(str, p))} = {dumps(value)[:80]}"
        if kind == 8:  # replace a value inside node args/kwargs by random JSON
            slots = [p for p, _ in self.slots(g["nodes"]) if len(p) >= 2 and p[1] in ("args", "kwargs")]
            if slots:
                p = r.choice(slots)
                value = self.rand_value(r)
                self.set_at(g["nodes"], p, value)
                return f"{where} nodes/{'/'.join(map(str, p))} = {dumps(value)[:80]}"
        if kind == 9:  # drop a field
            slots = [p for p, v in self.slots(art) if p and isinstance(p[-1], str)]
            p = r.choice(slots)
            self.delete_at(art, p)
            return f"drop field {'/'.join(map(str, p))}"
        if kind == 10 and nodes:  # duplicate/extra field on a node
            nd = r.choice(nodes)
            field_name = r.choice(["name", "op", "target", "args", "kwargs", "meta", "code", "extra", "__class__"])
            nd[field_name] = self.rand_value(r)
            return f"field {field_name} of {nd['name']} in {where} = {dumps(nd[field_name])[:60]}"
        if kind == 11:  # attributes / module_path
            if r.random() < 0.5 and g.get("attributes"):
                local = r.choice(sorted(g["attributes"]))
                new = r.choice(["head.weight", "block.fc2.bias", "head.load_state_dict", "__init__", "head.__dict__",
                                "block..fc1.weight", self.rand_str(r)])
                g["attributes"][local] = new
                return f"attribute {local} of {where} -> {new!r}"
            new = r.choice(["", "block", "head", "block.fc1", "block..fc1", "block.__class__", "..", self.rand_str(r)])
            old = g["module_path"]
            g["module_path"] = new
            return f"module_path {old!r} -> {new!r}"
        if kind == 12 and nodes:  # rename a node (references stay)
            nd = r.choice(nodes)
            old = nd["name"]
            nd["name"] = r.choice(["import", "class", "self", "torch", "operator", "__import__", "getattr", "x",
                                   "output", self.rand_str(r)])
            return f"rename node {old!r} -> {nd['name']!r} in {where}"
        if kind == 13 and len(nodes) > 1:  # reorder nodes
            i, j = r.randrange(len(nodes)), r.randrange(len(nodes))
            nodes[i], nodes[j] = nodes[j], nodes[i]
            return f"swap nodes {i} and {j} in {where}"
        if kind == 14 and len(graphs) > 1:  # move/duplicate/drop a child graph
            parent = r.choice([x for x in graphs if x["children"]])
            child = r.choice(parent["children"])
            action = r.randrange(3)
            if action == 0:
                parent["children"].remove(child)
                return f"drop child graph {child['name']} of {parent['module_path'] or '<root>'}"
            if action == 1:
                parent["children"].append(copy.deepcopy(child))
                return f"duplicate child graph {child['name']}"
            other = r.choice(graphs)
            other["children"].append(copy.deepcopy(child))
            return f"copy child graph {child['name']} into {other['module_path'] or '<root>'}"
        if kind == 15:  # nudge a number in the node arguments (a well-formed artifact computing something else)
            numbers = [(p, v) for p, v in self.slots(g["nodes"]) if len(p) >= 2 and p[1] in ("args", "kwargs")
                       and (isinstance(v, int) and not isinstance(v, bool) or isinstance(v, dict) and set(v) == {"f"})]
            if numbers:
                p, v = r.choice(numbers)
                if isinstance(v, int):
                    new: Any = r.choice([v + 1, v - 1, -v, 2 * v, 0])
                else:
                    try:
                        new = {"f": (float.fromhex(v["f"]) * r.choice([2.0, 0.5, -1.0, 10.0])).hex()}
                    except (TypeError, ValueError, OverflowError):
                        new = {"f": "0x1.0p+0"}
                self.set_at(g["nodes"], p, new)
                return f"number at {where} nodes/{'/'.join(map(str, p))}: {dumps(v)} -> {dumps(new)}"
        if kind == 16 and nodes:  # permute a node's positional arguments
            nd = r.choice(nodes)
            items = nd.get("args", {}).get("t") if isinstance(nd.get("args"), dict) else None
            if isinstance(items, list) and len(items) > 1:
                r.shuffle(items)
                return f"shuffle args of {nd.get('name')} in {where}"
        # fallback: random value in a node
        if nodes:
            nd = r.choice(nodes)
            nd["args"] = self.rand_value(r)
            return f"args of {nd['name']} in {where} = {dumps(nd['args'])[:80]}"
        return "no-op"


# ------------------------------------------------------------------------------------------
# One fuzz case, classified

OUTCOMES = ("refused_typed", "untyped_at_load", "loaded_equal", "loaded_different", "call_error_typed",
            "call_error_untyped")
FLAGS = ("payload_marker", "weights_changed", "global_state_changed")


class CaseTimeout(BaseException):
    """A fuzz case ran past its time limit (raised by SIGALRM; BaseException so that no
    ``except Exception`` inside the library swallows it)."""


@dataclass
class FuzzResult:
    outcome: str
    detail: str
    flags: List[str]
    seconds: float


def load_blob(data: bytes, model: nn.Module) -> Any:
    """The cache door without a store: the bytes of a blob -> ``read_artifact`` (parse, schema,
    static checks) -> ``PatchableGraph.from_artifact`` (bind-time checks), as a hit does."""
    from graphpatch_cache import PatchableGraph
    from graphpatch_cache.trust.validate import read_artifact

    return PatchableGraph.from_artifact(model, read_artifact(data, "<fuzz>"))


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"timeout after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_fuzz_case(legit: Legit, data: bytes, ctx: Ctx, time_limit: float = 20.0) -> FuzzResult:
    """Load ``data`` as a cache blob onto a fresh model, call it if it loaded, classify."""
    from graphpatch_cache.errors import GraphPatchCacheError

    model = legit.fresh_model()
    snap = snapshot_model(model)
    state = global_state()
    t0 = time.perf_counter()
    detail = ""
    try:
        with _time_limit(time_limit):
            try:
                pg = load_blob(data, model)
            except GraphPatchCacheError as exc:
                outcome, detail = "refused_typed", f"{type(exc).__name__}: {str(exc)[:200]}"
            except (Exception, CaseTimeout, RecursionError) as exc:  # noqa: BLE001 - classifying is the point
                outcome, detail = "untyped_at_load", f"{type(exc).__name__}: {str(exc)[:200]}"
            else:
                try:
                    out = pg(**legit.inputs)
                except GraphPatchCacheError as exc:
                    outcome, detail = "call_error_typed", f"{type(exc).__name__}: {str(exc)[:200]}"
                except (Exception, CaseTimeout) as exc:  # noqa: BLE001
                    outcome, detail = "call_error_untyped", f"{type(exc).__name__}: {str(exc)[:200]}"
                else:
                    same = isinstance(out, torch.Tensor) and out.shape == legit.expected.shape and torch.equal(
                        out.detach(), legit.expected)
                    outcome = "loaded_equal" if same else "loaded_different"
                    if not same:
                        detail = f"output {type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
    finally:
        changed_state = state_changes(state, global_state())
        restore_global_state(state)
    flags = []
    harm = ctx.harm()
    if harm:
        flags.append("payload_marker")
        detail += " | " + "; ".join(harm)
        ctx.reset()
    changes = model_changes(model, snap)
    if changes:
        flags.append("weights_changed")
        detail += " | " + "; ".join(changes[:3])
    if changed_state:
        flags.append("global_state_changed")
        detail += " | " + "; ".join(changed_state)
    return FuzzResult(outcome=outcome, detail=detail, flags=flags, seconds=time.perf_counter() - t0)


@dataclass
class FuzzReport:
    cases: int
    seed: int
    counts: Dict[str, int]
    examples: Dict[str, List[Dict[str, str]]]
    seconds: float
    slowest: List[Tuple[float, str]]

    def failures(self) -> List[Dict[str, str]]:
        """Cases that break a guarantee: untyped at load, a payload, a weight or state change."""
        out = list(self.examples.get("untyped_at_load", []))
        for flag in FLAGS:
            out += self.examples.get(flag, [])
        return out

    def as_json(self) -> Dict[str, Any]:
        return {"cases": self.cases, "seed": self.seed, "counts": self.counts, "examples": self.examples,
                "seconds": round(self.seconds, 2), "per_case_ms": round(1000 * self.seconds / max(self.cases, 1), 2),
                "slowest": [{"seconds": round(t, 2), "mutation": d} for t, d in self.slowest]}


def fuzz(legit: Legit, workdir: Path, cases: int, seed: int = 0, examples_per_outcome: int = 5,
         time_limit: float = 20.0, progress: Optional[Callable[[int, Dict[str, int]], None]] = None) -> FuzzReport:
    """``cases`` seeded mutations (case ``i`` uses seed ``seed + i``), each loaded and called."""
    ctx = Ctx(Path(workdir) / "fuzz-case")
    mutator = Mutator(legit.artifact, ctx_strings=[ctx.marker, ctx.cmd, str(ctx.victim)])
    counts = {name: 0 for name in OUTCOMES + FLAGS}
    examples: Dict[str, List[Dict[str, str]]] = {}
    slowest: List[Tuple[float, str]] = []
    t0 = time.perf_counter()
    for i in range(cases):
        data, description = mutator.mutate(seed + i)
        result = run_fuzz_case(legit, data, ctx, time_limit=time_limit)
        counts[result.outcome] += 1
        keys = ([] if result.outcome == "refused_typed" else [result.outcome]) + result.flags
        for key in result.flags:
            counts[key] += 1
        for key in keys:
            bucket = examples.setdefault(key, [])
            if len(bucket) < examples_per_outcome:
                bucket.append({"mutation": description, "outcome": result.outcome, "detail": result.detail[:400]})
        slowest = sorted(slowest + [(result.seconds, description)], reverse=True)[:5]
        if progress is not None:
            progress(i + 1, counts)
    return FuzzReport(cases=cases, seed=seed, counts=counts, examples=examples, seconds=time.perf_counter() - t0,
                      slowest=slowest)


__all__ = [
    "Block", "CaseTimeout", "Ctx", "F", "FLAGS", "Fn", "FuzzReport", "FuzzResult", "Legit", "Mutator", "OUTCOMES", "Payload", "Ref", "Tag", "Tiny",
    "artifact_bytes", "deliver_cache", "deliver_cli", "deliver_portable", "dumps", "enc", "example_inputs",
    "find_node", "fuzz", "global_state", "graph_at", "legit_setup", "load_blob", "make_model", "mirror_portable_bytes", "model_changes",
    "node", "plant_in_cache", "portable_bytes", "restore_global_state", "run_fuzz_case", "snapshot_model",
    "state_changes",
]
