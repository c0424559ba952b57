"""Call naming without a trace (issue 10, bug 1): the source spellings of a call resolve on the
objects, call expressions, call sites from stack traces (the traced half:
tests/integration/test_call_names.py)."""

from __future__ import annotations


import torch

from call_name_modules import Containers, IndexedList, ThroughGlobalAndList
from graphpatch_cache.extraction import naming



def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()










def test_source_forms_resolve_on_the_objects():
    """The source spellings dynamo versions use resolve to the same registered path; a path
    through anything but registered submodules does not resolve."""
    model = make(Containers)
    target = model.lin
    for source in ("L['self'].model.md.bar.baz.2", "L['self'].model._modules['md']._modules['bar'].baz[2]",
                   "L['self'].model.forward.__closure__[3].cell_contents.__self__.md.bar.baz.2"):
        assert naming.relative_path(model, source, model, target) == "md.bar.baz.2"
        assert naming.relative_path(model, source, model.md, target) == "bar.baz.2"
        assert naming.relative_path(model, source, model.md["bar"]["baz"], target) == "2"
    assert naming.relative_path(model, "L['self'].model.seq.0", model.seq, target) == "0"
    assert naming.relative_path(model, "L['self'].model.seq.0", model, target) == "seq.0"
    # wrong module at the end, caller not on the way, not from the model, not registered
    assert naming.relative_path(model, "L['self'].model.seq.1", model.seq, target) is None
    assert naming.relative_path(model, "L['self'].model.seq.0", model.md, target) is None
    assert naming.relative_path(model, "G['lin']", model, target) is None
    plain = make(ThroughGlobalAndList)
    assert naming.relative_path(plain, "L['self'].model.plain[0]", plain, plain.a) is None
    assert naming.relative_path(plain, "L['self'].model.a", plain, plain.a) == "a"


def test_call_expressions():
    """Which call expressions name a path: constant chains from ``self`` only."""
    assert naming._call_chain('self.blocks["first"](x)') == ["blocks", "first"]
    assert naming._call_chain("self.h[-1](x, y=2)") == ["h", -1]
    assert naming._call_chain("self.a.b[0].c(x)") == ["a", "b", 0, "c"]
    for expression in ("layer(x)", "self.h[i](x)", "torch.relu(x)", "self.a(x) + self.b(x)", "self(x)",
                       "other.a(x)", "self.a", "self.a(", "self.h[True](x)"):
        assert naming._call_chain(expression) is None, expression
    model = make(IndexedList)
    assert naming.site_path("self.layers[-1](y)", model, model.layers[2]) == "layers.2"
    assert naming.site_path("self.layers[-1](y)", model, model.layers[1]) is None  # not the called module
    assert naming.site_path("self.layers[3](y)", model, model.layers[2]) is None
    plain = make(ThroughGlobalAndList)
    assert naming.site_path("self.plain[0](x * 2)", plain, plain.a) is None  # not a registered path


def test_call_site_from_a_stack_trace():
    """The caller's frame is the one before our innermost forward wrapper; the carets give
    the call's columns, and a line without carets is the call itself."""
    wrapper = '  File "/x/graphpatch_cache/extraction/markers.py", line 338, in forward_with_markers\n' \
              "    args, kwargs = _route(ENTER, tag, (args, kwargs))\n" \
              "                   ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    root = '  File "/x/graphpatch_cache/extraction/capture.py", line 36, in forward\n' \
           "    return self.model(*args, **kwargs)\n" \
           "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    caller = '  File "/m.py", line 13, in forward\n' \
             "    return self.head(self.seq(x))\n" \
             "                     ^^^^^^^^^^^\n"
    assert naming.call_site(root + wrapper + caller + wrapper) == "self.seq(x)"
    # dynamo's carets under a nested call can take one column too many (seen with torch 2.13)
    assert naming.call_site(root + wrapper + caller.replace("^\n", "^^\n") + wrapper) == "self.seq(x)"
    # no caller frame shown (a torch.nn container's forward): the frame before is our wrapper
    assert naming.call_site(root + wrapper + wrapper) is None
    whole = '  File "/m.py", line 9, in forward\n    self.b(x)\n'
    assert naming.call_site(root + wrapper + whole + wrapper) == "self.b(x)"
    assert naming.call_site(wrapper) is None
    # a caller whose line is not available (code run by exec) has no call site
    assert naming.call_site(root + wrapper + '  File "<string>", line 3, in forward\n' + wrapper) is None
    assert naming.call_site("") is None
