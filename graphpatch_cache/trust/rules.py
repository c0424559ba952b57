"""Argument rules of particular call targets: the graph's own helper functions
(:mod:`.functions`) and ``getattr`` get exactly the argument shapes extraction writes.

Each rule takes the loader's checker (a :class:`Checker`: its ``refuse``/``spec`` and what
it knows of the graph being checked), the node path, the
target name, the encoded positional arguments and the keyword names.
"""

from __future__ import annotations

import keyword
import re
from typing import Any, Callable, Dict, List, Optional, Protocol, Set

from ..errors import DisallowedTargetError
from .allowlist import attribute_allowed, is_dunder, valid_dotted
from .functions import _MODULE_INTERNALS

MODULE_REF = "_graphpatch_module"
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Checker(Protocol):
    """What a rule uses of the loader's checker (:class:`graphpatch_cache.trust.validate._Checker`)."""

    #: module path -> names of its parameters, buffers and children (recorded structure)
    members: Dict[str, Set[str]]
    module_path: str  # of the graph being checked
    attribute_nodes: Dict[str, str]  # module_attribute node name -> the attribute it reads

    def refuse(self, where: str, target: str, why: str) -> DisallowedTargetError: ...

    def spec(self, text: Any, where: str) -> None: ...


def ref(v: Any) -> Optional[str]:
    """The node an encoded value refers to (``{"n": name}``), or None."""
    return v["n"] if isinstance(v, dict) and len(v) == 1 and "n" in v else None


def _rule_getattr(c: Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 2 or kwnames or ref(args[0]) is None or not isinstance(args[1], str):
        raise c.refuse(where, target, "getattr takes a node and a literal attribute name")
    if not attribute_allowed(args[1]):
        raise c.refuse(where, target, f"getattr of {args[1][:60]!r}, which is not an allowed attribute")


def _rule_tree_build(c: Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 2 or kwnames or not isinstance(args[0], str) or not (isinstance(args[1], dict) and "l" in args[1]):
        raise c.refuse(where, target, "tree_build takes a spec string and a list of values")
    c.spec(args[0], where)


def _rule_run_opaque(c: Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    ok = (len(args) in (6, 7) and not kwnames and ref(args[0]) == MODULE_REF and isinstance(args[1], str)
          and isinstance(args[2], dict) and "l" in args[2] and isinstance(args[3], dict) and "l" in args[3]
          and all(isinstance(b, bool) for b in args[3]["l"]) and len(args[2]["l"]) == len(args[3]["l"])
          # a constant may be a node (a size the call takes as an int), never where a tensor goes
          and not any(t and ref(c) for c, t in zip(args[2]["l"], args[3]["l"]))
          and isinstance(args[4], dict) and "l" in args[4] and all(ref(x) for x in args[4]["l"])
          and sum(args[3]["l"]) == len(args[4]["l"])
          and isinstance(args[5], dict) and "d" in args[5]
          and all(isinstance(k, str) and valid_dotted(k) and ref(v) for k, v in args[5]["d"])
          # the module's attributes: {name: the node reading that attribute}; patching can put
          # another value there, an artifact cannot (a parameter's alias set as an attribute
          # would let the module's own `self.x += 1` write into a weight)
          and (len(args) == 6 or (isinstance(args[6], dict) and "d" in args[6] and all(
              _attribute_name_ok(k) and c.attribute_nodes.get(ref(v) or "") == k for k, v in args[6]["d"]))))
    if not ok:
        raise c.refuse(where, target, "run_opaque takes the module reference, a spec, constants, tensor flags, "
                       "tensors, named parameters and named attributes, as extraction writes them")
    c.spec(args[1], where)


def _attribute_name_ok(name: Any) -> bool:
    """A name an opaque graph may read and set on its module: an identifier, no dunder, none of
    nn.Module's own names (binding also checks the live module: plain data, no descriptor,
    no parameter, buffer or child, see ``functions.attribute_exposed``)."""
    return isinstance(name, str) and bool(IDENTIFIER.fullmatch(name)) and not keyword.iskeyword(name) \
        and not is_dunder(name) and name not in _MODULE_INTERNALS


def _rule_module_attribute(c: Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 2 or kwnames or ref(args[0]) != MODULE_REF or not _attribute_name_ok(args[1]):
        raise c.refuse(where, target, "module_attribute takes the module reference and a literal attribute name "
                       "(an identifier, no dunder, none of nn.Module's own names)")
    if args[1] in c.members.get(c.module_path, ()):
        raise c.refuse(where, target, f"{args[1]!r} is a parameter, buffer or child of the graph's module, not a "
                       "plain-data attribute")


def _rule_linear_8bit(c: Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 4 or kwnames or ref(args[0]) != MODULE_REF or ref(args[1]) is None:
        raise c.refuse(where, target, "linear_8bit takes the module reference, an input, a weight and a bias")


def _rule_set_grad(c: Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 1 or kwnames or not isinstance(args[0], bool):
        raise c.refuse(where, target, "set_grad_enabled takes one literal bool")


def _rule_restore_grad(c: Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    if len(args) != 1 or kwnames or ref(args[0]) is None:
        raise c.refuse(where, target, "restore_grad_enabled takes the node that switched grad mode")


def _rule_forward_only(c: Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    label = args[0] if args else None
    ok = isinstance(label, str) and 1 <= len(parts := label.split(".")) <= 2 and all(IDENTIFIER.fullmatch(p) for p in parts)
    if len(args) != 2 or kwnames or not ok or ref(args[1]) is None:
        raise c.refuse(where, target, "forward_only takes a literal label (Function or Module.Function, identifiers) "
                       "and a node")


def _rule_setitem(c: Checker, where: str, target: str, args: List[Any], kwnames: List[str]) -> None:
    # ``x[i] = v`` writes into a value the graph holds (the write rules refuse a parameter's
    # alias); never into a module attribute's live object, which would outlive the call
    target_node = ref(args[0]) if len(args) == 3 and not kwnames else None
    if target_node is None or target_node in c.attribute_nodes:
        raise c.refuse(where, target, "setitem takes a node of the graph (not a module attribute), an index and "
                       "a value")


RULES: Dict[str, Callable[..., None]] = {
    "_operator.setitem": _rule_setitem,
    "builtins.getattr": _rule_getattr,
    "graphpatch_cache.functions.tree_build": _rule_tree_build,
    "graphpatch_cache.functions.run_opaque": _rule_run_opaque,
    "graphpatch_cache.functions.module_attribute": _rule_module_attribute,
    "graphpatch_cache.functions.linear_8bit": _rule_linear_8bit,
    "graphpatch_cache.functions.set_grad_enabled": _rule_set_grad,
    "graphpatch_cache.functions.restore_grad_enabled": _rule_restore_grad,
    "graphpatch_cache.functions.forward_only": _rule_forward_only,
}
MODULE_ATTRIBUTE = "graphpatch_cache.functions.module_attribute"
TAKES_MODULE = frozenset({"graphpatch_cache.functions.run_opaque", "graphpatch_cache.functions.linear_8bit",
                           "graphpatch_cache.functions.module_attribute"})


__all__ = ["Checker", "IDENTIFIER", "MODULE_ATTRIBUTE", "MODULE_REF", "RULES", "TAKES_MODULE", "ref"]
