"""The model zoo: every architecture of ``tests/helpers/zoo.py`` (tiny configs) with its default
attention, and eager too where a family's eager attention is its own code (``zoo.suite_cases``;
``scripts/model_zoo.py`` runs eager and sdpa for every causal LM that has both).

Per case, one ``load_cached`` into the module's store for that case (shared by its tests, which
pytest runs together: the fixture is module-scoped and parametrized) serves:

- compiled: no opaque module;
- exact: every output leaf ``torch.equal`` to the plain model's (and at another shape, same graph);
- probe and zero on the middle layer's MLP value, against forward pre-hooks on the plain model;
- a second ``load_cached`` through a fresh local tier is a hit, and exact;
- causal LMs: ``pg.generate`` with the key/value cache in use equals ``model.generate``.

A case whose extraction fails fails every test of it with the extraction's error (extracted
once). ``scripts/model_zoo.py`` runs the same checks and writes ``docs/models.md``.
"""

from __future__ import annotations

import ast
import inspect

import pytest

import zoo
import zoo_checks as checks

pytestmark = pytest.mark.slow  # extracts every architecture of the zoo

CASES = zoo.suite_cases()
CAUSAL = [c for c in CASES if zoo.BY_NAME[c[0]].kind == "causal"]


class _Case:
    """The checks of one case. One class per case: the README's ``pytest -n 2 --dist loadscope``
    sends a class to one worker (its extraction is shared by its tests), and the cases spread
    over the workers."""

    case: tuple = ("", "")

    @pytest.fixture(scope="class")
    def zcase(self, request, tmp_path_factory):
        name, attn = request.cls.case
        try:
            return checks.extract(name, attn, tmp_path_factory.mktemp(f"zoo-{name}-{attn}"))
        except Exception as exc:  # fails each test of the case (pytest would repeat a failed setup)
            return exc

    def test_compiled(self, zcase):
        checks.check_compiled(_case(zcase))

    def test_exact(self, zcase):
        checks.check_exact(_case(zcase))

    def test_probe_and_zero(self, zcase):
        checks.check_probe_and_zero(_case(zcase))

    def test_cache_hit(self, zcase):
        checks.check_hit(_case(zcase))


class _CausalCase(_Case):
    def test_generate_with_kv_cache(self, zcase):
        checks.check_generate(_case(zcase))


def _case(zcase):
    if isinstance(zcase, Exception):
        raise zcase
    return zcase


for _name, _attn in CASES:
    _cls = type(f"TestZoo_{_name}_{_attn}", (_CausalCase if (_name, _attn) in CAUSAL else _Case,),
                {"case": (_name, _attn)})
    globals()[_cls.__name__] = _cls


def test_the_zoo_covers_the_issue():
    """The architectures the issue names are all here, and each middle-layer node is the
    module's input (so the pre-hook oracle sees the same value)."""
    wanted = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe",
              "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "falcon", "bloom", "opt",
              "olmo", "olmo2", "stablelm", "starcoder2", "cohere", "granite", "deepseek_v3", "glm4", "bert",
              "roberta", "distilbert", "albert", "electra", "deberta_v2", "t5", "bart", "mbart", "whisper",
              "vit", "clip_text", "clip_vision"}
    assert wanted <= set(zoo.BY_NAME)
    assert len({c for c in CASES}) == len(CASES)


def _eager_attention_tree(arch):
    module = inspect.getmodule(arch.model_cls())
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.FunctionDef) and node.name == "eager_attention_forward":
            return ast.dump(node)
    return None


def test_the_suite_skips_only_eager_cases_that_are_llamas_code():
    """The suite leaves out a family's eager case only when its eager attention is Llama's,
    node for node, at the installed transformers (an upgrade that gives a family its own code
    brings its eager case back by failing here)."""
    llama = _eager_attention_tree(zoo.BY_NAME["llama"])
    assert llama is not None
    suite = set(zoo.suite_cases())
    for name, attn in zoo.cases():
        if (name, attn) not in suite:
            assert attn == "eager" and _eager_attention_tree(zoo.BY_NAME[name]) == llama, name
    assert {name for name, attn in suite if attn == "sdpa"} | {n for n, a in suite if a == "eager"} == set(zoo.BY_NAME)
