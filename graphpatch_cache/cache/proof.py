"""Proof that a cache entry belongs to its key.

A key is the digest of its key material (:func:`~graphpatch_cache.cache.keys.key_material`:
environment, model structure and config, input fingerprint, options). A ref names a blob
under a key, and anyone who can write the shared root can make a ref name any intact blob:
a bug or a hostile write could put the artifact of a differently structured model under
your key. So every ref records the material its key was computed from, less the model's
module and tensor lists (the artifact already records those as ``extraction.structure``,
and they are the bulk of it), and an entry *belongs to its key* when

1. ``digest_of(recorded material + the artifact's structure) == key``, and
2. the artifact agrees with that material: the same model class, training flag, extraction
   options, versions, and a signature of the shape class the input fingerprint describes.

``load_cached`` has the live model, so on a hit it checks (2) against the material it just
computed the key from (1 holds by construction) and that the ref records that material.
``verify`` has no model: it checks (1) and (2) from the ref. A failure is treated like a
damaged entry. What this cannot show: that a well-formed artifact of the right structure
computes what the model computes (a changed constant); ``verify --rebuild`` shows that.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from ..artifact import GraphArtifact
from ..live.structure import first_difference
from ..artifact.signature import SYMBOLIC, matches, signature_key
from .keys import SIZE_CLASS, digest_of

#: the parts of ``material["model"]`` a ref leaves out: the artifact's ``extraction.structure``
STRUCTURE_FIELDS = ("modules", "tensors")


def recorded_material(material: Dict[str, Any]) -> Dict[str, Any]:
    """What a ref records of ``material``: all of it but the model's module/tensor lists."""
    model = {k: v for k, v in material["model"].items() if k not in STRUCTURE_FIELDS}
    return dict(material, model=model)


def complete_material(recorded: Any, artifact: GraphArtifact) -> Optional[Dict[str, Any]]:
    """The full key material: ``recorded`` plus the artifact's structure (None if either is
    malformed)."""
    structure = artifact.extraction.get("structure") if isinstance(artifact.extraction, dict) else None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("model"), dict) or not isinstance(structure, dict):
        return None
    if any(not isinstance(structure.get(f), list) for f in STRUCTURE_FIELDS):
        return None
    model = dict(recorded["model"], **{f: structure[f] for f in STRUCTURE_FIELDS})
    return dict(recorded, model=model)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def fingerprint_of_signature(signature: Dict[str, Any]) -> Dict[str, Any]:
    """The input fingerprint (see :func:`~graphpatch_cache.cache.keys.input_fingerprint`) of
    any call a concrete ``signature`` describes."""
    leaves = []
    for leaf in signature["leaves"]:
        if leaf["kind"] == "tensor":
            leaves.append(["tensor", "torch." + leaf["dtype"], [0 if d == 0 else SIZE_CLASS for d in leaf["dims"]]])
        else:
            leaves.append(["const", leaf["value"]])
    return {"spec": signature["spec"], "leaves": leaves}


def _signature_fits_fingerprint(signature: Dict[str, Any], fingerprint: Dict[str, Any]) -> Optional[str]:
    if signature.get("spec") != fingerprint.get("spec"):
        return "its call signature has other arguments than the key's inputs"
    want, have = fingerprint["leaves"], signature["leaves"]
    if len(want) != len(have):
        return "its call signature has another number of inputs than the key's"
    for i, (fp, leaf) in enumerate(zip(want, have)):
        kind = leaf.get("kind")
        if fp[0] != kind:
            return f"input #{i} is a {kind} in its signature but a {fp[0]} in the key's inputs"
        if kind == "const":
            if leaf.get("value") != fp[1]:
                return f"input #{i} is the constant {leaf.get('value')!r} in its signature, {fp[1]!r} in the key's"
            continue
        if "torch." + str(leaf.get("dtype")) != fp[1] or len(leaf.get("dims", ())) != len(fp[2]):
            return f"input #{i} has dtype/rank {leaf.get('dtype')}/{len(leaf.get('dims', ()))} in its signature"
        for size, cls in zip(leaf["dims"], fp[2]):
            ok = (size in SYMBOLIC or (isinstance(size, int) and size >= 1)) if cls == SIZE_CLASS else size == cls
            if not ok:
                return f"input #{i} has dims {leaf['dims']} in its signature, {fp[2]} in the key's inputs"
    return None


def disagreement(material: Dict[str, Any], artifact: GraphArtifact) -> Optional[str]:
    """Why ``artifact`` cannot be the graph of the call ``material`` describes, or None.

    ``material`` is a full key material (a live one, or :func:`complete_material`).
    """
    try:
        return _disagreement(material, artifact)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # hostile shapes of data
        return f"its key material or artifact is malformed ({type(exc).__name__})"


def _disagreement(material: Dict[str, Any], artifact: GraphArtifact) -> Optional[str]:
    model = material["model"]
    if artifact.model_class != model["model_class"]:
        return f"the artifact is the graph of a {artifact.model_class}, the key's model is a {model['model_class']}"
    extraction = artifact.extraction
    structure = extraction.get("structure")
    if not isinstance(structure, dict):
        return "the artifact records no model structure"
    live = {f: model[f] for f in STRUCTURE_FIELDS}
    if any(structure.get(f) != live[f] for f in STRUCTURE_FIELDS):
        why = first_difference(structure, live) or "its module or tensor lists differ"
        return f"the artifact was extracted from another model structure than the key's: {why}"
    if extraction.get("training") != model["training"]:
        return f"the artifact was extracted in {'training' if extraction.get('training') else 'eval'} mode, the key's model is not"
    if canonical(extraction.get("options")) != canonical(material["options"]):
        return "the artifact was extracted with other extraction options than the key's"
    environment = material["environment"]
    if artifact.schema_version != environment.get("schema_version"):
        return f"the artifact has schema_version {artifact.schema_version}, the key {environment.get('schema_version')}"
    for package, version in sorted(artifact.versions.items()):
        if package in environment and environment[package] != version:
            return f"the artifact was extracted with {package} {version}, the key is for {environment[package]}"
    return _signature_fits_fingerprint(artifact.signature, material["inputs"])


def entry_disagreement(key: str, variant: str, ref: Dict[str, Any], artifact: GraphArtifact) -> Optional[str]:
    """Why the entry (``ref``, named ``<variant>.json`` under ``key``, and its ``artifact``)
    does not prove it belongs to ``key``, or None. Needs no model (``verify``)."""
    recorded = ref.get("material")
    if recorded is None:
        return ("the ref records no key material, so nothing shows the artifact belongs to this key "
                "(written by an older release, or imported from a file without it)")
    full = complete_material(recorded, artifact)
    if full is None:
        return "the ref's key material or the artifact's model structure is malformed"
    try:
        digest = digest_of(full)
    except (TypeError, ValueError, RecursionError):
        return "the ref's key material is malformed"
    if digest != key:
        return (f"the ref's key material and the artifact's model structure give key {digest[:12]}, not this one: "
                "the artifact (or the ref) belongs to another model")
    why = disagreement(full, artifact)
    if why is not None:
        return why
    return ref_disagreement(variant, ref, artifact, full)


def ref_disagreement(variant: str, ref: Dict[str, Any], artifact: GraphArtifact,
                     material: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why the ref's own fields (name, signature, example) do not describe ``artifact``."""
    try:
        if ref.get("signature") != artifact.signature:
            return "the ref's call signature differs from the artifact's"
        if variant != signature_key(artifact.signature):
            return f"the ref is named {variant}.json but the artifact's signature makes it {signature_key(artifact.signature)}.json"
        example = ref.get("example")
        if example is not None:
            if not isinstance(example, dict) or not matches(artifact.signature, example):
                return "the ref's example inputs do not fit the artifact's call signature"
            if material is not None and canonical(fingerprint_of_signature(example)) != canonical(material["inputs"]):
                return "the ref's example inputs are not of the key's input fingerprint"
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        return f"the ref is malformed ({type(exc).__name__})"
    return None


def live_disagreement(material: Dict[str, Any], recorded_text: Optional[str], ref: Dict[str, Any],
                      variant: str, artifact: GraphArtifact) -> Optional[str]:
    """Why a hit's entry does not belong to the key of the live ``material`` (``load_cached``).

    :param recorded_text: ``canonical(recorded_material(material))``, computed once per lookup.
    """
    recorded = ref.get("material")
    try:
        if recorded is not None and canonical(recorded) != recorded_text:
            return "the ref records the key material of another model or environment"
    except (TypeError, ValueError, RecursionError):
        return "the ref's key material is malformed"
    return disagreement(material, artifact) or ref_disagreement(variant, ref, artifact, material)


__all__: List[str] = ["STRUCTURE_FIELDS", "canonical", "complete_material", "disagreement", "entry_disagreement",
                      "fingerprint_of_signature", "live_disagreement", "recorded_material", "ref_disagreement"]
