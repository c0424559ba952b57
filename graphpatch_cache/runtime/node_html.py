"""``pg.graph`` (or any sub-path) as HTML in a notebook: a searchable, collapsible node tree.

:func:`node_tree_html` is what ``NodePath._repr_html_`` returns. The output is one
self-contained fragment (inline CSS and a few lines of inline JavaScript, no framework, no
network), for JupyterLab, Notebook 7 and classic Notebook, and VS Code:

- the tree's data is **one JSON blob** (per node: its path, parent, kind and indexes into a
  table of repeated strings: labels, source lines), and the JavaScript builds a subtree's rows
  only when it is opened, so a 7B model's thousands of nodes cost a few hundred KB of text
  and a DOM of the rows one has opened;
- the top level is also written as plain HTML, so a front end that does not run scripts
  still shows something readable;
- a search box filters paths (substring, case-insensitive; an input also by its alias,
  ``input`` for ``input_``), showing each match with its ancestors; a click on a name
  copies its path (what ``pg.patch`` takes);
- colours come from JupyterLab's (``--jp-*``) or VS Code's (``--vscode-*``) theme variables,
  with light and dark fallbacks (``prefers-color-scheme``) that set a background as well as a
  foreground, so the text stays readable whatever the page around it is.

An artifact may come from a shared store, so every string from it is untrusted: in HTML it
goes through :func:`html.escape`; in the JSON blob ``<``, ``>`` and ``&`` are written as
``\\u003c``-style escapes (the blob can never close its ``<script>`` element), and the
JavaScript puts text into the page with ``textContent`` only, never as markup.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import re
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

if TYPE_CHECKING:  # node_path imports this module to render itself
    from .node_path import NodePath

#: ``File "path", line N, in fn: code``: how extraction records a node's source line
_SOURCE = re.compile(r'^File "(?P<file>.*)", line (?P<line>\d+), in (?P<func>[^:]*): (?P<code>.*)$', re.S)
_KIND_GRAPH, _KIND_VALUE, _KIND_PART = 0, 1, 2
#: rows shown for a search at most (the DOM stays bounded however many paths match)
MAX_SEARCH_ROWS = 1500
_ids = itertools.count()
_SESSION = os.urandom(4).hex()  # two notebooks' outputs on one page never share an id


def split_source(source: Any) -> Tuple[str, str]:
    """``(where, code)`` of a recorded source line: ``("file.py:9 in forward", "h = f(x)")``;
    ``("", text)`` for text of another form."""
    if not isinstance(source, str):
        return "", ""
    m = _SOURCE.match(source)
    if m is None:
        return "", source
    return f"{m['file']}:{m['line']} in {m['func']}", m["code"]


class _Strings:
    """A table of the strings that repeat across layers (labels, source lines)."""

    def __init__(self) -> None:
        self.items: List[str] = [""]
        self._index: Dict[str, int] = {"": 0}

    def __call__(self, text: str) -> int:
        i = self._index.get(text)
        if i is None:
            i = self._index[text] = len(self.items)
            self.items.append(text)
        return i


def _label(node: "NodePath") -> str:
    """What the text tree shows after a node's name (its class, or shape and dtype)."""
    label = node._np_label()
    name = label.partition(": ")[0]
    return label[len(name) + 2:] if label.startswith(name + ": ") else ""


def tree_data(node: "NodePath") -> Dict[str, Any]:
    """The blob the page's script reads: ``{"root": path, "strings": [...], "nodes": [[path,
    parent index (-1: the root), kind, label index, source-location index, code index, alias
    path or ""], ...]}``, every node below ``node`` (module graphs, values and the parts of nested
    values), depth first."""
    strings = _Strings()
    nodes: List[List[Any]] = []

    def walk(parent: "NodePath", parent_index: int) -> None:
        for child in parent._np_children.values():
            kind = _KIND_GRAPH if child._np_graph is not None else _KIND_PART if child._np_keys else _KIND_VALUE
            where, code = split_source(child._code) if kind != _KIND_GRAPH else ("", "")
            alias = child._np_alias_name if kind == _KIND_VALUE else ""  # an input's name by place (``input``)
            alias = f"{parent}.{alias}" if alias and str(parent) else alias
            nodes.append([str(child), parent_index, kind, strings(_label(child)), strings(where), strings(code), alias])
            walk(child, len(nodes) - 1)

    walk(node, -1)
    return {"root": str(node), "strings": strings.items, "nodes": nodes}


def _script_json(data: Any) -> str:
    """JSON that can sit inside a ``<script>`` element whatever strings it holds."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _static_rows(node: "NodePath") -> str:
    """The top level as plain HTML (shown where scripts do not run; the script replaces it)."""
    rows = []
    for child in node._np_children.values():
        where, code = split_source(child._code) if child._np_graph is None else ("", "")
        name = str(child)[len(str(node)) + 1:] if str(node) else str(child)
        rows.append(
            f'<li><span class="gpc-name">{html.escape(name)}</span> <span class="gpc-label">'
            f'{html.escape(_label(child))}</span>'
            + (f' <span class="gpc-src" title="{html.escape(where)}">{html.escape(code)}</span>' if code else "")
            + "</li>")
    return "".join(rows)


_CSS = """
#ID{--gpc-fg:var(--jp-content-font-color1,var(--vscode-editor-foreground,#1f2328));
--gpc-muted:var(--jp-content-font-color2,var(--vscode-descriptionForeground,#57606a));
--gpc-accent:var(--jp-brand-color1,var(--vscode-textLink-foreground,#0550ae));
--gpc-code:var(--jp-mirror-editor-string-color,var(--vscode-debugTokenExpression-string,#0a3069));
--gpc-bg:var(--jp-layout-color0,var(--vscode-editor-background,#ffffff));
--gpc-input-bg:var(--jp-input-background,var(--vscode-input-background,#ffffff));
--gpc-border:var(--jp-border-color1,var(--vscode-input-border,#8c959f));
--gpc-hit:var(--jp-warn-color3,var(--vscode-editor-findMatchHighlightBackground,#fff8c5));
color:var(--gpc-fg);background:var(--gpc-bg);font-family:var(--jp-code-font-family,var(--vscode-editor-font-family,monospace));
font-size:var(--jp-code-font-size,13px);line-height:1.45;padding:4px 6px;border-radius:4px}
@media (prefers-color-scheme:dark){#ID{--gpc-fg:var(--jp-content-font-color1,var(--vscode-editor-foreground,#e6edf3));
--gpc-muted:var(--jp-content-font-color2,var(--vscode-descriptionForeground,#9198a1));
--gpc-accent:var(--jp-brand-color1,var(--vscode-textLink-foreground,#4493f8));
--gpc-code:var(--jp-mirror-editor-string-color,var(--vscode-debugTokenExpression-string,#a5d6ff));
--gpc-bg:var(--jp-layout-color0,var(--vscode-editor-background,#0d1117));
--gpc-input-bg:var(--jp-input-background,var(--vscode-input-background,#161b22));
--gpc-border:var(--jp-border-color1,var(--vscode-input-border,#3d444d));
--gpc-hit:var(--jp-warn-color3,var(--vscode-editor-findMatchHighlightBackground,#3b2e00))}}
#ID input{color:var(--gpc-fg);background:var(--gpc-input-bg);border:1px solid var(--gpc-border);
border-radius:3px;padding:2px 6px;width:28em;max-width:100%;font:inherit}
#ID .gpc-bar{display:flex;gap:1em;align-items:center;margin-bottom:4px}
#ID .gpc-status{color:var(--gpc-muted)}
#ID ul{list-style:none;margin:0;padding-left:1.2em}
#ID>ul{padding-left:0}
#ID li{white-space:nowrap}
#ID .gpc-tw{display:inline-block;width:1.1em;cursor:pointer;color:var(--gpc-muted);user-select:none}
#ID .gpc-name{cursor:copy;font-weight:600}
#ID .gpc-name:hover{color:var(--gpc-accent);text-decoration:underline}
#ID .gpc-hit>.gpc-name{background:var(--gpc-hit)}
#ID .gpc-label{color:var(--gpc-muted)}
#ID .gpc-src{color:var(--gpc-code);margin-left:.8em}
"""

# The page's script: reads the blob, builds rows on demand, filters, copies. Text goes in
# with textContent only (the blob's strings are untrusted).
_JS = """
(function(){var box=document.getElementById("ID");if(!box||box.getAttribute("data-ready"))return;
box.setAttribute("data-ready","1");
var D=JSON.parse(box.querySelector("script[type='application/json']").textContent),N=D.nodes,S=D.strings;
var kids={},root=D.root,status=box.querySelector(".gpc-status"),top=box.querySelector("ul"),MAX=MAXROWS;
for(var i=0;i<N.length;i++){(kids[N[i][1]]=kids[N[i][1]]||[]).push(i);}
function nameOf(i){var p=N[i][0],q=N[i][1]<0?root:N[N[i][1]][0];return q&&p.indexOf(q)===0?p.slice(q.length+1):p;}
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text)e.textContent=text;return e;}
function copy(text){function old(){var t=document.createElement("textarea");t.value=text;box.appendChild(t);t.select();
try{document.execCommand("copy");}catch(e){}box.removeChild(t);}
if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(text).catch(old);}else{old();}
status.textContent="copied: "+text;}
function row(i,open,only){var n=N[i],li=el("li");li.setAttribute("data-path",n[0]);
var has=!!kids[i],tw=el("span","gpc-tw",has?"\\u25b8":"");li.appendChild(tw);
var nm=el("span","gpc-name",nameOf(i));nm.title="click to copy: "+n[0];li.appendChild(nm);
nm.addEventListener("click",function(){copy(n[0]);});
if(S[n[3]]){li.appendChild(document.createTextNode(" "));li.appendChild(el("span","gpc-label",S[n[3]]));}
if(S[n[5]]){var s=el("span","gpc-src",S[n[5]]);s.title=S[n[4]];li.appendChild(s);}
if(has){var ul=el("ul"),built=false;ul.hidden=true;li.appendChild(ul);
function toggle(show){if(show&&!built){fill(ul,kids[i],only);built=true;}ul.hidden=!show;tw.textContent=show?"\\u25be":"\\u25b8";}
tw.addEventListener("click",function(){toggle(ul.hidden);});if(open)toggle(true);}
return li;}
function fill(ul,list,only){for(var k=0;k<list.length;k++){var j=list[k];if(only&&!only[j])continue;
var li=row(j,!!only,only);if(only&&only[j]===2)li.className="gpc-hit";ul.appendChild(li);}}
function show(q){top.textContent="";box.setAttribute("data-query",q);q=q.trim().toLowerCase();
if(!q){fill(top,kids[-1]||[],null);status.textContent=N.length+" nodes";return;}
var only={},hits=0;for(var i=0;i<N.length&&hits<MAX;i++){if(N[i][0].toLowerCase().indexOf(q)>=0||(N[i][6]&&N[i][6].toLowerCase().indexOf(q)>=0)){hits++;only[i]=2;
for(var p=N[i][1];p>=0&&!only[p];p=N[p][1])only[p]=1;}}
fill(top,kids[-1]||[],only);
status.textContent=hits>=MAX?"first "+MAX+" matching paths shown":hits+" matching path"+(hits===1?"":"s");}
var input=box.querySelector("input"),timer=null;
input.addEventListener("input",function(){clearTimeout(timer);timer=setTimeout(function(){show(input.value);},N.length>5000?150:0);});
show(input.value);})();
"""


def node_tree_html(node: "NodePath") -> str:
    """``node``'s tree as a self-contained HTML fragment (see the module docstring)."""
    uid = f"gpc-{_SESSION}-{next(_ids)}"
    data = tree_data(node)
    title = html.escape(node._np_label())
    css = _CSS.replace("#ID", f"#{uid}")
    js = _JS.replace('"ID"', f'"{uid}"').replace("MAXROWS", str(MAX_SEARCH_ROWS))
    return (
        f'<div id="{uid}" class="gpc-tree"><style>{css}</style>'
        f'<div class="gpc-bar"><strong>{title}</strong>'
        f'<input type="search" placeholder="filter paths (substring)" aria-label="filter node paths">'
        f'<span class="gpc-status">{len(data["nodes"])} nodes</span></div>'
        f'<ul>{_static_rows(node)}</ul>'
        f'<script type="application/json">{_script_json(data)}</script>'
        f"<script>{js}</script></div>"
    )


class HtmlView:
    """``_repr_html_`` for :class:`~graphpatch_cache.runtime.node_path.NodePath` (its base
    class): a notebook shows the HTML tree, ``repr`` stays the text tree."""

    def _repr_html_(self) -> str:
        return node_tree_html(self)  # type: ignore[arg-type]  # (only NodePath derives from it)


__all__ = ["HtmlView", "MAX_SEARCH_ROWS", "node_tree_html", "split_source", "tree_data"]
