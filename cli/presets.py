"""Built-in presets and the other places a MODEL argument can name.

A preset ships only a configuration: the ``config.json`` of the named checkpoint on the Hub,
verbatim (less ``transformers_version``, ``_name_or_path``), so a graph built from it has the
key ``load_cached`` computes for ``from_pretrained(<hub id>)`` of the same transformers
version. The tiny presets are small-width models for trying things out and for tests.

MODEL resolves in this order: a preset name, a local directory holding ``config.json``, a
Hub id already in the local Hugging Face cache (never downloaded: offline only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from graphpatch_cache.cache import BuildError
from graphpatch_cache.errors import close_matches

_GPT2_COMMON: Dict[str, Any] = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "embd_pdrop": 0.1,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_positions": 1024,
    "resid_pdrop": 0.1,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}

_LLAMA_7B_COMMON: Dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32000,
}


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named model configuration (``config.json`` content)."""

    name: str
    description: str
    config: Dict[str, Any]
    hub_id: Optional[str] = None


PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="tiny-gpt2",
            description="GPT-2 architecture, 2 layers, width 32, vocab 128 (seconds to build)",
            config={
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "n_layer": 2,
                "n_embd": 32,
                "n_head": 2,
                "n_positions": 64,
                "vocab_size": 128,
                "bos_token_id": 0,
                "eos_token_id": 0,
            },
        ),
        Preset(
            name="tiny-llama",
            description="Llama architecture, 2 layers, width 32, grouped-query attention, vocab 128",
            config={
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 64,
                "vocab_size": 128,
                "bos_token_id": 0,
                "eos_token_id": 0,
                "pad_token_id": 0,
            },
        ),
        Preset(
            name="gpt2",
            hub_id="openai-community/gpt2",
            description="GPT-2 small: 12 layers, width 768, 124M parameters",
            config={**_GPT2_COMMON, "n_embd": 768, "n_head": 12, "n_layer": 12},
        ),
        Preset(
            name="gpt2-xl",
            hub_id="openai-community/gpt2-xl",
            description="GPT-2 XL: 48 layers, width 1600, 1.5B parameters",
            config={**_GPT2_COMMON, "n_embd": 1600, "n_head": 25, "n_layer": 48, "output_past": True},
        ),
        Preset(
            name="llama-7b",
            hub_id="huggyllama/llama-7b",
            description="LLaMA 7B: 32 layers, width 4096, float16",
            config={**_LLAMA_7B_COMMON, "max_position_embeddings": 2048, "max_sequence_length": 2048,
                    "pad_token_id": 0, "rms_norm_eps": 1e-06},
        ),
        Preset(
            name="llama-2-7b",
            hub_id="meta-llama/Llama-2-7b-hf",
            description="Llama 2 7B: 32 layers, width 4096, 4096 positions, float16",
            config={**_LLAMA_7B_COMMON, "max_position_embeddings": 4096, "num_key_value_heads": 32,
                    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None},
        ),
        Preset(
            name="mistral-7b",
            hub_id="mistralai/Mistral-7B-v0.1",
            description="Mistral 7B v0.1: 32 layers, width 4096, 8 KV heads, sliding window, bfloat16",
            config={
                "architectures": ["MistralForCausalLM"],
                "bos_token_id": 1,
                "eos_token_id": 2,
                "hidden_act": "silu",
                "hidden_size": 4096,
                "initializer_range": 0.02,
                "intermediate_size": 14336,
                "max_position_embeddings": 32768,
                "model_type": "mistral",
                "num_attention_heads": 32,
                "num_hidden_layers": 32,
                "num_key_value_heads": 8,
                "rms_norm_eps": 1e-05,
                "rope_theta": 10000.0,
                "sliding_window": 4096,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
                "use_cache": True,
                "vocab_size": 32000,
            },
        ),
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    """A MODEL argument turned into a transformers config."""

    name: str
    source: str  # "preset", "directory" or "hub"
    config: Any

    @property
    def origin(self) -> str:
        """What ``ls`` shows an entry was built from: ``preset: NAME``, ``directory: ABSOLUTE
        PATH`` or ``hub: ID``."""
        if self.source == "directory":
            return f"directory: {Path(self.name).expanduser().resolve()}"
        return f"{self.source}: {self.name}"


def preset_config(preset: Preset) -> Any:
    """The transformers config of ``preset``, made as ``from_pretrained`` makes it."""
    from transformers import AutoConfig  # deferred: transformers loads only for commands that need a model

    data = dict(preset.config)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _load_config(location: str, **kwargs: Any) -> Any:
    from transformers import AutoConfig  # deferred: transformers loads only for commands that need a model

    return AutoConfig.from_pretrained(location, local_files_only=True, **kwargs)


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache may hold ``repo_id``'s config (True when unsure)."""
    try:
        from huggingface_hub import try_to_load_from_cache  # optional: transformers' own dependency
    except ImportError:
        return True
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed repo id: transformers says what is wrong with it
        return True
    return isinstance(found, str)


def resolve_model(spec: str) -> ResolvedModel:
    """A preset name, a directory with ``config.json``, or a Hub id in the local HF cache.

    :raises BuildError: none of these, with a hint saying how to get the config.
    """
    if spec in PRESETS:
        return ResolvedModel(spec, "preset", preset_config(PRESETS[spec]))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BuildError(f"{path} has no config.json",
                             hint="pass a directory written by save_pretrained(), a preset name or a Hub id")
        try:
            return ResolvedModel(spec, "directory", _load_config(str(path)))
        except (OSError, ValueError, KeyError) as exc:
            raise BuildError(f"cannot read {path / 'config.json'}: {_first_line(exc)}",
                             hint="is it a transformers config.json? (model_type must be one transformers knows)") from exc
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
    if path.exists() or looks_like_path:
        raise BuildError(f"{spec} is not a directory" if path.exists() else f"no such directory: {spec}",
                         hint="pass a directory containing config.json, a preset name or a Hub id")
    try:
        if not _in_hub_cache(spec):  # answers at once, before transformers loads
            raise OSError(f"{spec} has no config.json in the local Hugging Face cache")
        return ResolvedModel(spec, "hub", _load_config(spec))
    except (OSError, ValueError, KeyError) as exc:
        similar = close_matches(spec, PRESETS)
        if similar:
            hint = f"did you mean {' or '.join(similar)}? presets: {', '.join(PRESETS)}"
        else:
            hint = (f"download its config first (`hf download {spec} config.json`), or pass a preset "
                    f"({', '.join(PRESETS)}) or a directory with config.json")
        raise BuildError(f"{spec!r} is not a preset, a directory, or a Hub model in the local "
                         f"Hugging Face cache (nothing is downloaded)", hint=hint) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["PRESETS", "Preset", "ResolvedModel", "preset_config", "resolve_model"]
