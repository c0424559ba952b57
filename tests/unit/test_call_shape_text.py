"""A variant's call shape read back from its signature (what ``ls`` and ``show`` print), and a
ref's ``origin`` as display text. Oracle: signatures written out by hand in the format
``artifact/signature.py`` stores (a torch pytree spec as JSON, one leaf per tensor or
constant), and the exact strings a terminal receives."""

from __future__ import annotations

import json

from graphpatch_cache.cache.records import ORIGIN_LIMIT, clip_origin
from graphpatch_cache.cache.summary import call_shape, describe_call_shape, printable

LEAF = {"type": None, "context": None, "children_spec": []}


def _signature(kwargs, leaves, cache_layers=0):
    children = []
    for name in kwargs:
        if name == "cache":
            children.append({"type": "graphpatch_cache.CacheState", "context": json.dumps(cache_layers),
                             "children_spec": [LEAF] * (2 * cache_layers)})
        elif name.endswith("=None"):
            children.append({"type": "builtins.NoneType", "context": "null", "children_spec": []})
        else:
            children.append(LEAF)
    names = [n.removesuffix("=None") for n in kwargs]
    spec = [1, {"type": "builtins.tuple", "context": "null", "children_spec": [
        {"type": "builtins.tuple", "context": "null", "children_spec": []},
        {"type": "builtins.dict", "context": json.dumps(names), "children_spec": children}]}]
    return {"spec": json.dumps(spec), "leaves": leaves}


def _tensor(dtype, *dims):
    return {"kind": "tensor", "dtype": dtype, "device": "cpu", "dims": list(dims)}


def test_a_tokenizer_call_and_the_decode_step_in_words_and_as_data():
    forward = _signature(["input_ids", "attention_mask"], [_tensor("int64", "dyn", "dyn")] * 2)
    assert describe_call_shape(forward) == "input_ids[b,s] int64, attention_mask[b,s] int64; use_cache: model default"
    assert call_shape(forward)["kind"] == "forward" and call_shape(forward)["use_cache"] is None
    kv = _tensor("float16", "dyn", 8, "dyn", 64)
    step = _signature(["input_ids", "attention_mask", "cache", "use_cache"],
                      [_tensor("int64", "dyn", 1), _tensor("int64", "dyn", "dyn"), kv, kv, kv, kv,
                       {"kind": "const", "value": True}], cache_layers=2)
    assert describe_call_shape(step) == ("input_ids[b,1] int64, attention_mask[b,s] int64; use_cache=True; "
                                         "cache: decode (2 layers [b,8,past,64] float16)")
    shape = call_shape(step)
    assert shape["kind"] == "decode" and shape["cache"] == {"name": "cache", "layers": 2, "dtype": "float16",
                                                           "dims": ["b", 8, "past", 64]}
    prompt = _signature(["input_ids", "labels=None", "use_cache"], [_tensor("int32", 1, "dyn"),
                                                                    {"kind": "const", "value": True}])
    assert describe_call_shape(prompt) == "input_ids[1,s] int32, labels=None; use_cache=True; cache: prefill (makes a new one)"


def test_a_signature_this_release_cannot_read_is_said_so_not_raised():
    for broken in ({"spec": "not json", "leaves": []}, {"spec": json.dumps([1, {}]), "leaves": []}, {}):
        assert call_shape(broken) == {"kind": "unknown"}
        assert describe_call_shape(broken) == "(a signature this release cannot read)"


def test_origin_is_clipped_and_escaped_for_terminals():
    assert clip_origin("preset: tiny-gpt2") == "preset: tiny-gpt2"
    assert clip_origin(3) is None and clip_origin("") is None and clip_origin(None) is None
    long = "directory: /" + "a" * 500 + "/model"
    assert len(clip_origin(long)) == ORIGIN_LIMIT and clip_origin(long).endswith("/model")
    assert printable("\x1b[31mred\r\n\u202eevil\tok") == "\\x1b[31mred\\r\\n\\u202eevil\\tok"
    assert printable("ünïcode: fine") == "ünïcode: fine"
