"""The GPU checks of issue 4, as one prepared script: device_map="auto" and 8-bit on CUDA.

For a session that has the device machine: run it there with a timeout that leaves room to
rerun, e.g. ``python scripts/gpu_check.py`` (``--device cpu`` runs the same checks here,
where device_map="auto" places everything on the CPU). Every check compares with the
unwrapped model on the same device and dtype (torch.equal); prints one JSON object and
exits 1 if any check fails. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from graphpatch_cache import CacheStore, ProbePatch, ZeroPatch, load_cached  # noqa: E402


def _tiny(folder: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)


def _checks(model: torch.nn.Module, store: CacheStore, device: str) -> dict:
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    out: dict = {}
    start = time.perf_counter()
    pg = load_cached(model, store=store, **inputs)
    out["first_load_s"] = round(time.perf_counter() - start, 3)
    with torch.no_grad():
        ref = model(**inputs).logits
        out["exact"] = torch.equal(pg(**inputs).logits, ref)
        other = {"input_ids": ids[:1, :7], "attention_mask": mask[:1, :7], "use_cache": False}
        out["exact_other_shape"] = torch.equal(pg(**other).logits, model(**other).logits)
        seen = {}
        layer = model.model.layers[1].mlp
        handle = layer.register_forward_hook(lambda m, a, o: seen.update(o=o.detach()))
        model(**inputs)
        handle.remove()
        with pg.patch({"model.layers_1.mlp.output": (probe := ProbePatch())}):
            pg(**inputs)
        out["probe_equals_hook"] = torch.equal(probe.activation, seen["o"])
        handle = layer.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
        zeroed = model(**inputs).logits
        handle.remove()
        with pg.patch({"model.layers_1.mlp.output": ZeroPatch()}):
            out["patch_equals_hook"] = torch.equal(pg(**inputs).logits, zeroed)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True)
    out["cached_generate_exact"] = torch.equal(pg.generate(ids, attention_mask=mask, max_new_tokens=8,
                                                           use_cache=True), expected)
    start = time.perf_counter()
    again = load_cached(model, store=store, **inputs)
    out["hit_s"] = round(time.perf_counter() - start, 3)
    out["hit"] = again.cache_stats.hits == 1 and again.cache_stats.misses == 0
    out["devices"] = sorted({str(p.device) for p in model.parameters()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = args.device
    report: dict = {"device": device, "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    folder = tempfile.mkdtemp()
    _tiny(folder)
    store = CacheStore(tempfile.mkdtemp())
    cases = {
        "device_map_auto": dict(device_map="auto" if device != "cpu" else {"": "cpu"}),
        # accelerate moves activations between the GPU and the CPU inside one forward
        "device_map_split": dict(device_map={"model.embed_tokens": device, "model.layers.0": device,
                                             "model.layers.1": "cpu", "model.norm": "cpu",
                                             "model.rotary_emb": "cpu", "lm_head": "cpu"}),
        "8bit": dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device}),
        "float16": dict(dtype=torch.float16, device_map={"": device}),
    }
    ok = True
    for name, kwargs in cases.items():
        try:
            model = LlamaForCausalLM.from_pretrained(folder, **kwargs).eval()
            result = _checks(model, store, device)
            passed = all(v for k, v in result.items() if isinstance(v, bool))
        except Exception as exc:  # report every case, then fail
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            passed = False
        result["passed"] = passed
        ok = ok and passed
        report[name] = result
    report["passed"] = ok
    print(json.dumps(report, indent=2, default=str))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
