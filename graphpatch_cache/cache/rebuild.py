"""verify --rebuild: extract an entry again from what its ref records and compare digests.

Artifacts are deterministic bytes: the same model structure, config, example signature,
options and versions give the same sha256. An entry that passes every static check and
proves it belongs to its key (:mod:`~graphpatch_cache.cache.proof`) can still compute
something else (a changed constant); rebuilding it and comparing digests is how a teammate
checks. Call map::

    verify_rebuild(store, key)                        one RebuildReport per variant
      -> the entry: blob digest, read_artifact, proof  (else status "invalid")
      -> rebuild_artifact(material, example, extraction)
           _model_plan   config class and model class from transformers' own auto
                         mappings (model_type -> names), never a name from the entry
           meta_model    on the meta device (or the single real device it was traced on)
           _example      example tensors of the recorded shapes; constants decoded
           key check     the rebuilt key material must digest to the key
           extract       -> sha256 of the bytes vs the stored digest

Nothing named by an entry is imported: the config class and the model class are looked up
in transformers' mappings by ``model_type`` and the recorded class name must be one that
transformers itself maps that ``model_type`` to. Models that are not transformers models,
configs asking for remote code or hub kernels, and options naming classes or functions are
refused with :class:`RebuildError`. Nothing on disk changes.
"""

from __future__ import annotations

import collections
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from .. import _compat
from ..artifact import GraphArtifact, decode_value, qualname
from ..compose import extract
from ..errors import BuildError, GraphPatchCacheError, RebuildError
from ..integrations import kv_cache
from ..integrations.transformers import meta_model
from ..live.inputs import CallInputs
from ..options import ExtractionOptions
from ..trust.validate import read_artifact
from .keys import digest_of, key_material
from .proof import canonical, complete_material, entry_disagreement
from .records import CacheEntry, Problem
from .store import CacheStore


@dataclass(frozen=True)
class RebuildReport:
    """The outcome of rebuilding one variant of a key.

    :ivar status: ``match`` (the rebuilt artifact has the stored digest), ``differs`` (it
        does not: the entry computes something else than this machine builds),
        ``cannot-rebuild`` (see ``message``) or ``invalid`` (the entry fails the checks
        ``verify`` makes without rebuilding).
    """

    key: str
    variant: str
    digest: str
    rebuilt_digest: Optional[str]
    status: str
    message: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "match"


#: attention implementations a rebuild may ask transformers for (anything else may name a
#: hub kernel, i.e. code to download and run)
_ATTENTION = frozenset({None, "eager", "sdpa"})
_8BIT = "bitsandbytes.nn.modules.Linear8bitLt"


def verify_rebuild(store: CacheStore, key: str) -> List[RebuildReport]:
    """Rebuild every variant of ``key`` and report whether each one's digest matches.

    Read-only: nothing in the store (or its local tier) changes.
    """
    reports = []
    for entry in store.variants(key):
        start = time.perf_counter()

        def report(status: str, message: str, rebuilt: Optional[str] = None) -> RebuildReport:
            return RebuildReport(key=entry.key, variant=entry.variant, digest=entry.digest, rebuilt_digest=rebuilt,
                                 status=status, message=message, seconds=time.perf_counter() - start)

        try:
            stored = _stored_artifact(store, entry)
        except GraphPatchCacheError as exc:
            reports.append(report("invalid", exc.message))
            continue
        try:
            rebuilt = rebuild_artifact(complete_material(entry.material, stored), entry.example, stored.extraction,
                                       key=entry.key)
        except GraphPatchCacheError as exc:
            message = exc.message if exc.message.startswith("cannot rebuild") else f"cannot rebuild: {exc.message}"
            reports.append(report("cannot-rebuild", message))
            continue
        digest = hashlib.sha256(rebuilt.to_json().encode()).hexdigest()
        if digest == entry.digest:
            reports.append(report("match", "the rebuilt artifact has the stored digest", digest))
        else:
            reports.append(report("differs", f"the stored digest {entry.digest[:12]} differs from the rebuild's "
                                             f"{digest[:12]}: the entry computes something other than what this "
                                             "machine builds for its key", digest))
    return reports


def check_rebuilds(store: CacheStore, key: str, *, skip: Iterable[str] = (),
                   fix: bool = False) -> Tuple[List[RebuildReport], List[Problem]]:
    """``verify --rebuild``: rebuild the variants of ``key`` (but those in ``skip``, e.g. the
    ones :meth:`CacheStore.check` already found bad) and turn each one whose digest differs,
    or that cannot be rebuilt here, into a :class:`Problem` (kinds ``rebuild-differs`` and
    ``cannot-rebuild``). With ``fix``, the refs whose rebuild differs are quarantined (those
    that cannot be rebuilt here are kept)."""
    skipped = set(skip)
    reports = [r for r in verify_rebuild(store, key) if r.variant not in skipped]
    problems: List[Problem] = []
    for r in reports:
        if r.ok:
            continue
        kind = "rebuild-differs" if r.status == "differs" else "cannot-rebuild"
        ref = store.location(store._ref_name(r.key, r.variant))
        problems.append(Problem(path=ref, key=r.key, message=r.message, variant=r.variant, kind=kind))
        if fix and kind == "rebuild-differs":
            store.quarantine_variant(r.key, r.variant)
    return reports, problems


def _stored_artifact(store: CacheStore, entry: CacheEntry) -> GraphArtifact:
    data, why = store._read_shared(entry.digest)
    if data is None:
        raise RebuildError(f"the blob is {why}")
    artifact = read_artifact(data, store._blob_path(entry.digest))
    problem = entry_disagreement(entry.key, entry.variant, entry.ref(), artifact)
    if problem is not None:
        raise RebuildError(f"does not belong to its key: {problem}")
    return artifact


def rebuild_artifact(material: Optional[Dict[str, Any]], example: Optional[Dict[str, Any]],
                     extraction: Dict[str, Any], *, key: Optional[str] = None) -> GraphArtifact:
    """Extract the artifact that ``material`` (a full key material), ``example`` (a concrete
    signature) and the stored ``extraction`` record describe.

    :param key: when given, the rebuilt model and inputs must give this key.
    :raises RebuildError: it cannot be rebuilt here (the message says why).
    """
    if material is None or example is None:
        raise RebuildError("cannot rebuild: the entry records no key material or example inputs",
                           hint="build it again with this release (graphpatch-cache build, or load_cached)")
    config, cls, attn = _model_plan(material)
    dtype, quantization = _dtype_and_quantization(material["model"])
    device = _device(extraction, quantization)
    options = _options(material["options"])
    try:
        model = meta_model(config, model_class=cls, dtype=dtype, quantization=quantization, attn_implementation=attn)
    except BuildError:
        raise
    except Exception as exc:  # transformers refusing the config: report it, do not crash verify
        raise RebuildError(f"cannot rebuild: transformers cannot build {cls.__name__} from the recorded config "
                           f"({type(exc).__name__}: {exc!s:.200})") from exc
    if device.type != "meta":
        _materialize(model, device)
    if material["model"].get("training"):
        model.train()
    inputs = _example(example, model, device)
    if key is not None:
        rebuilt = key_material(model, options=options, inputs=inputs)
        if digest_of(rebuilt) != key:
            raise RebuildError(f"cannot rebuild here: {_material_difference(material, rebuilt)}",
                               hint="rebuild where the entry was built (same python, torch, transformers and "
                                    "graphpatch-cache versions)")
    return extract(model, options=options, inputs=inputs)


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give the meta parameters zeros on ``device`` (ties kept: one new tensor per old one)
    and move the buffers there with their values (position ids, rotary frequencies: graphs
    index with them). Graphs do not depend on parameter values."""
    made: Dict[int, torch.nn.Parameter] = {}
    moved: Dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(torch.zeros(param.shape, dtype=param.dtype, device=device),
                                                     requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                if id(buffer) not in moved:
                    moved[id(buffer)] = buffer.to(device)
                module._buffers[name] = moved[id(buffer)]


# -- the model ------------------------------------------------------------------------------------
def _architectures(model_type: str) -> List[str]:
    """Every model class name transformers' auto mappings give ``model_type``."""
    from transformers.models.auto import modeling_auto  # optional dependency, deferred

    names: List[str] = []
    for attr in dir(modeling_auto):
        if not (attr.startswith("MODEL_") and attr.endswith("_MAPPING_NAMES")):
            continue
        value = getattr(modeling_auto, attr).get(model_type)
        for name in [value] if isinstance(value, str) else list(value or ()):
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


def _model_plan(material: Dict[str, Any]) -> Tuple[Any, type, Optional[str]]:
    """(config, model class, attention implementation) from transformers' own mappings."""
    model = material["model"]
    model_class, config = model.get("model_class"), model.get("config")
    if not isinstance(model_class, str) or not model_class.startswith("transformers.") or not isinstance(config, dict):
        raise RebuildError(f"cannot rebuild: not a transformers model ({model_class})",
                           hint="a custom model is rebuilt where its code is: load_cached(model, ...) with "
                                "store=CacheStore(<empty directory>) and compare the digests")
    try:  # optional dependency, deferred: importing the cache must not import transformers
        import transformers
        from transformers.models.auto.configuration_auto import (  # not re-exported at the top level
            CONFIG_MAPPING,
            CONFIG_MAPPING_NAMES,
        )
    except ImportError as exc:
        raise RebuildError("cannot rebuild: transformers is not installed") from exc
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise RebuildError(f"cannot rebuild: transformers {transformers.__version__} knows no model_type {model_type!r}")
    name = model_class.rpartition(".")[2]
    if name not in _architectures(model_type):
        raise RebuildError(f"cannot rebuild: {model_class} is not a class transformers maps model_type "
                           f"{model_type!r} to")
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or qualname(cls) != model_class:
        raise RebuildError(f"cannot rebuild: transformers' {name} is not {model_class}")
    _check_config(config, "config")
    data = dict(config)
    attn = data.pop("_attn_implementation", None)
    if attn not in _ATTENTION:
        raise RebuildError(f"cannot rebuild: attention implementation {attn!r} (only eager and sdpa are rebuilt)")
    try:
        config_obj = CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as exc:
        raise RebuildError(f"cannot rebuild: transformers refuses the recorded {model_type} config "
                           f"({type(exc).__name__}: {exc!s:.200})") from exc
    return config_obj, cls, attn


def _check_config(value: Any, where: str) -> None:
    """No remote code (``auto_map``), no hub kernels (``*_implementation`` naming a repo)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "auto_map":
                raise RebuildError(f"cannot rebuild: the config asks for remote code ({where}.auto_map)")
            if isinstance(k, str) and k.endswith("implementation") and isinstance(v, str) and not v.isidentifier():
                raise RebuildError(f"cannot rebuild: {where}.{k} = {v!r} names code to download")
            _check_config(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_config(v, f"{where}[{i}]")


def _dtype_and_quantization(model: Dict[str, Any]) -> Tuple[torch.dtype, Optional[str]]:
    classes = {cls for _, cls in model.get("modules", [])}
    if any(c.startswith("bitsandbytes.") and c != _8BIT for c in classes):
        raise RebuildError("cannot rebuild: only 8-bit bitsandbytes models are rebuilt")
    quantization = "8bit" if _8BIT in classes else None
    counts = collections.Counter(t[3] for t in model.get("tensors", []) if t[0] == "param")
    for name, _ in counts.most_common():
        dtype = getattr(torch, str(name).removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype, quantization
    return torch.float32, quantization


def _device(extraction: Dict[str, Any], quantization: Optional[str]) -> torch.device:
    devices = extraction.get("devices")
    # parameters on meta (buffers may stay on the CPU: init_empty_weights(include_buffers=False))
    if devices == [] or (isinstance(devices, list) and "meta" in devices and set(devices) <= {"meta", "cpu"}):
        return torch.device("meta")
    if not isinstance(devices, list) or len(devices) != 1 or not isinstance(devices[0], str):
        raise RebuildError(f"cannot rebuild: the graphs were extracted from a model spread over {devices}",
                           hint="build such entries ahead of time with `graphpatch-cache build` (on the meta device)")
    try:
        device = torch.device(devices[0])
    except (RuntimeError, ValueError) as exc:
        raise RebuildError(f"cannot rebuild: unknown device {devices[0]!r}") from exc
    available = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available()
                                         and (device.index or 0) < torch.cuda.device_count())
    if not available:
        raise RebuildError(f"cannot rebuild here: the graphs were traced on {device}, which this machine lacks",
                           hint="run verify --rebuild on a machine with that device")
    if quantization is not None:
        raise RebuildError(f"cannot rebuild: an 8-bit model traced on {device} (8-bit entries are rebuilt from "
                           "`graphpatch-cache build`, on the meta device)")
    return device


def _options(fingerprint: Dict[str, Any]) -> ExtractionOptions:
    if fingerprint.get("classes_to_skip_compiling") or fingerprint.get("custom_extraction_functions") \
            or fingerprint.get("postprocessing_function") is not None:
        raise RebuildError("cannot rebuild: the extraction options name classes or functions, which a rebuild "
                           "would have to import")
    flags: Dict[str, Any] = {k: v for k, v in fingerprint.items() if isinstance(v, bool)}
    try:
        options = ExtractionOptions(**flags)
    except TypeError as exc:
        raise RebuildError(f"cannot rebuild: unknown extraction options ({exc})") from exc
    if canonical(options.fingerprint()) != canonical(fingerprint):
        raise RebuildError("cannot rebuild: the recorded extraction options are not ones this release makes")
    return options


# -- the example inputs ---------------------------------------------------------------------------
#: a rebuild allocates real example tensors only on a real device; bound them
_MAX_ELEMENTS = 1 << 28


def _example(example: Dict[str, Any], model: torch.nn.Module, device: torch.device) -> CallInputs:
    """Example inputs of the recorded concrete signature: integer and boolean tensors of
    ones (a valid token, an all-ones mask), float tensors of zeros; constants decoded (never
    a callable). Graphs do not depend on the values (dynamo traces shapes, not data)."""
    try:
        spec = _compat.treespec_loads(example["spec"])
        leaves = [_leaf(leaf, device) for leaf in example["leaves"]]
        inputs = _compat.tree_unflatten(leaves, spec)
    except RebuildError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
        raise RebuildError(f"cannot rebuild: malformed example inputs ({type(exc).__name__}: {exc!s:.200})") from exc
    if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple)
            and isinstance(inputs[1], dict)):
        raise RebuildError("cannot rebuild: the example inputs are not (args, kwargs)")
    args, kwargs = inputs
    kwargs = {k: (kv_cache.new_cache(v) if isinstance(v, kv_cache.CacheState) else v) for k, v in kwargs.items()}
    if any(isinstance(a, kv_cache.CacheState) for a in args):
        raise RebuildError("cannot rebuild: a positional key/value cache")
    inputs = CallInputs.of(model, args, kwargs)
    if inputs.concrete_signature != example:
        raise RebuildError("cannot rebuild: the example inputs made from the record do not have its signature")
    return inputs


def _leaf(leaf: Dict[str, Any], device: torch.device) -> Any:
    if leaf["kind"] == "const":
        return decode_value(leaf["value"], _no_nodes, _no_callables)
    if leaf["kind"] != "tensor":
        raise RebuildError(f"cannot rebuild: unknown example leaf kind {leaf['kind']!r}")
    dtype = getattr(torch, str(leaf["dtype"]), None)
    dims = leaf["dims"]
    if not isinstance(dtype, torch.dtype) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in dims):
        raise RebuildError(f"cannot rebuild: malformed example tensor {leaf!r:.120}")
    where = torch.device("meta") if leaf.get("device") == "meta" else (device if device.type != "meta" else torch.device("cpu"))
    count = 1
    for d in dims:
        count *= d
    if where.type != "meta" and count > _MAX_ELEMENTS:
        raise RebuildError(f"cannot rebuild: an example tensor of {count} elements")
    fill = torch.ones if (dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex)) else torch.zeros
    return fill(dims, dtype=dtype, device=where)


def _no_nodes(name: str) -> Any:
    raise RebuildError("cannot rebuild: an example constant refers to a graph node")


def _no_callables(name: str) -> Any:
    raise RebuildError(f"cannot rebuild: an example constant is a callable ({name!s:.80})")


def _material_difference(recorded: Dict[str, Any], rebuilt: Dict[str, Any]) -> str:
    """A sentence naming the first part of the key material that differs."""
    env_a, env_b = recorded.get("environment", {}), rebuilt.get("environment", {})
    for package in sorted(set(env_a) | set(env_b)):
        if env_a.get(package) != env_b.get(package):
            return (f"the entry was built with {package} {env_a.get(package)}, this environment has "
                    f"{env_b.get(package)}")
    model_a, model_b = recorded.get("model", {}), rebuilt.get("model", {})
    for part in ("model_class", "training", "config", "modules", "tensors", "sources"):
        if canonical(model_a.get(part)) != canonical(model_b.get(part)):
            what = {"sources": "the source files of its model classes (another transformers install?)",
                    "config": "its config"}.get(part, f"its {part}")
            return f"the model rebuilt from the record differs from the entry's in {what}"
    if canonical(recorded.get("inputs")) != canonical(rebuilt.get("inputs")):
        return "the example inputs rebuilt from the record differ from the entry's"
    return "the rebuilt key material differs from the entry's"


__all__ = ["RebuildError", "RebuildReport", "check_rebuilds", "rebuild_artifact", "verify_rebuild"]
