"""config.json of a Hugging Face checkpoint to and from our ModelConfig, for the families we can hold exactly
(Llama, Mistral, Qwen2, GPT-2). Features we do not implement are refused by name."""

import json
from pathlib import Path
from typing import Any

from aifab.nn.config import ModelConfig

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
FAMILIES = (*LLAMA_FAMILY, "gpt2")


def read_config(root: Path) -> dict[str, Any]:
    """config.json of the checkpoint in directory `root`, whose model_type must be a family we hold; else
    ValueError naming the file."""
    path = root / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: a Hugging Face checkpoint needs config.json")
    try:
        hf: dict[str, Any] = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return hf


def _need(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise ValueError(f"config.json has no {key!r}, which a {hf['model_type']} model needs")
    return hf[key]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for an HF config.json dict; features we do not implement are refused by name."""
    if hf["model_type"] == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"config.json: activation_function {act!r} is not supported (gelu_new only)")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise ValueError(f"config.json: {key}=true is not supported")
        if hf.get("scale_attn_weights") is False:
            raise ValueError("config.json: scale_attn_weights=false is not supported")
        d = int(_need(hf, "n_embd"))
        return ModelConfig(
            vocab_size=_need(hf, "vocab_size"),
            n_layer=_need(hf, "n_layer"),
            n_head=_need(hf, "n_head"),
            d_model=d,
            context_len=_need(hf, "n_positions"),
            ffn_hidden=hf.get("n_inner") or 4 * d,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            norm="layer",
            mlp="gelu",
            pos="learned",
            bias=True,
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (silu only)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json: {key}=true is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    d, n_head = int(_need(hf, "hidden_size")), int(_need(hf, "num_attention_heads"))
    if hf.get("head_dim") not in (None, d // n_head):
        raise ValueError(f"config.json: head_dim {hf['head_dim']} other than hidden_size / heads is not supported")
    window = hf.get("sliding_window")
    if hf["model_type"] == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size"),
        n_layer=_need(hf, "num_hidden_layers"),
        n_head=n_head,
        d_model=d,
        context_len=_need(hf, "max_position_embeddings"),
        ffn_hidden=_need(hf, "intermediate_size"),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        n_kv_heads=hf.get("num_key_value_heads") or n_head,
        qkv_bias=hf["model_type"] == "qwen2",
        sliding_window=window,
    )


def family_of(config: ModelConfig) -> str:
    """The HF model_type that holds this config exactly; ValueError if none does."""
    if (config.norm, config.mlp, config.pos, config.bias) == ("layer", "gelu", "learned", True):
        if config.kv_heads == config.n_head and config.sliding_window is None:
            return "gpt2"
    elif (config.norm, config.mlp, config.pos, config.bias) == ("rms", "swiglu", "rope", False):
        if config.qkv_bias:
            return "qwen2"
        return "mistral" if config.sliding_window is not None else "llama"
    raise ValueError("no Hugging Face family has this model's shape (norm, mlp, pos and biases)")


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """config.json for the model's family."""
    family = family_of(config)
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_positions": config.context_len,
            "n_embd": config.d_model,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.hidden,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "tie_word_embeddings": config.tie_embeddings,
            "torch_dtype": "float32",
        }
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.context_len,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # transformers >= 5
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
    }
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if family == "mistral":
        out["sliding_window"] = config.sliding_window
    if family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    return out
