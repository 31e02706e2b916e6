"""Hugging Face checkpoints to and from our Transformer: Llama, Mistral, Qwen2 and GPT-2, safetensors only.

`load_hf(dir)` reads `config.json` and one or several `*.safetensors` files (sharded with
`model.safetensors.index.json` or not) and returns our ModelConfig plus a state dict under our names.
`save_hf(model, dir)` writes `config.json` and `model.safetensors` in the format of the model's family.
`read_generation(dir)` reads what generation needs (BOS/EOS ids and strings, whether the tokenizer adds BOS, the
chat template) from the optional generation_config.json, tokenizer_config.json, chat_template.jinja and
tokenizer.json; `save_hf(..., generation=...)` writes it back.
Nothing is ever unpickled: a directory holding only `pytorch_model.bin` is refused. Every failure is a
ValueError whose message names the file, key or tensor at fault. `transformers` is not needed.

Layouts: Llama's q and k weights are stored for the half-split rotary layout that `apply_rope` uses, so they are
concatenated as they are. GPT-2 stores Conv1D weights as (in, out); they are transposed.
"""

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aifab.nn.config import ModelConfig
from aifab.nn.transformer import Transformer

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
FAMILIES = (*LLAMA_FAMILY, "gpt2")
PICKLED = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")
# buffers some checkpoints carry that are not weights: causal masks and rotary frequencies
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# GPT-2 block tensors: (HF name, our name, stored as Conv1D, i.e. (in, out), so transposed both ways)
GPT2_LAYER = (
    ("ln_1", "attn_norm", False),
    ("attn.c_attn", "attn.wqkv", True),
    ("attn.c_proj", "attn.wo", True),
    ("ln_2", "mlp_norm", False),
    ("mlp.c_fc", "mlp.up", True),
    ("mlp.c_proj", "mlp.down", True),
)


def _read_config(root: Path) -> dict[str, Any]:
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


def _read_tensors(root: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        files = [root / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        pickled = sorted({p.name for pattern in PICKLED for p in root.glob(pattern)})
        if pickled:
            raise ValueError(
                f"{root} holds only pickled weights ({', '.join(pickled)}); aifab never unpickles: "
                "save the checkpoint with safe_serialization=True (model.safetensors)"
            )
        raise ValueError(f"{root} has no *.safetensors weights")
    tensors: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path} is named by {index.name} but does not exist")
        try:
            tensors.update(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    return tensors


def _rename(family: str, config: ModelConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF tensor names and layouts -> ours. A missing HF tensor raises ValueError naming it."""

    def take(name: str) -> Tensor:
        if name not in hf:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        return hf.pop(name)

    ours: dict[str, Tensor] = {}
    if family == "gpt2":
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
        ours["tok_emb.weight"], ours["pos_emb.weight"] = take("wte.weight"), take("wpe.weight")
        for i in range(config.n_layer):
            h, b = f"h.{i}.", f"blocks.{i}."
            for theirs, mine, conv in GPT2_LAYER:
                w = take(f"{h}{theirs}.weight")
                ours[f"{b}{mine}.weight"] = w.t().contiguous() if conv else w  # Conv1D: (in, out)
                ours[f"{b}{mine}.bias"] = take(f"{h}{theirs}.bias")
        ours["norm.weight"], ours["norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
    else:
        ours["tok_emb.weight"] = take("model.embed_tokens.weight")
        for i in range(config.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            ours[f"{b}attn_norm.weight"] = take(f"{h}input_layernorm.weight")
            ours[f"{b}attn.wqkv.weight"] = torch.cat([take(f"{h}self_attn.{p}_proj.weight") for p in "qkv"])
            if config.qkv_bias:
                ours[f"{b}attn.wqkv.bias"] = torch.cat([take(f"{h}self_attn.{p}_proj.bias") for p in "qkv"])
            ours[f"{b}attn.wo.weight"] = take(f"{h}self_attn.o_proj.weight")
            ours[f"{b}mlp_norm.weight"] = take(f"{h}post_attention_layernorm.weight")
            for p in ("gate", "up", "down"):
                ours[f"{b}mlp.{p}.weight"] = take(f"{h}mlp.{p}_proj.weight")
        ours["norm.weight"] = take("model.norm.weight")
    head = hf.pop("lm_head.weight", None)
    if not config.tie_embeddings:
        if head is None:
            raise ValueError("checkpoint is missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
        ours["lm_head.weight"] = head
    unexpected = sorted(k for k in hf if not k.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"checkpoint has unexpected tensors: {', '.join(unexpected[:3])}")
    return ours


def load_hf(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and weights (our names, as stored dtypes) of the HF checkpoint in directory `path`.

    The weights are checked against the shapes the config implies; a wrong one raises ValueError naming it.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    hf_config = _read_config(root)
    tensors = _read_tensors(root)  # before the config's details: a pickle-only directory is the first thing to say
    try:
        config = config_from_hf(hf_config)
    except TypeError as e:
        raise ValueError(f"{root / 'config.json'}: {e}") from None
    state = _rename(hf_config["model_type"], config, tensors)
    with torch.device("meta"):  # shapes only, no memory
        expected = Transformer(config).state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    for name, ref in expected.items():
        if name not in state:
            raise ValueError(f"checkpoint is missing tensor for {name!r}")
        if state[name].shape != ref.shape:
            raise ValueError(f"tensor {name!r} is {list(state[name].shape)}, config.json implies {list(ref.shape)}")
    return config, state


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


def hf_state(model: Transformer) -> dict[str, Tensor]:
    """The model's weights under HF names and layouts, contiguous and on the CPU."""
    config, family = model.config, family_of(model.config)
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    kv = config.kv_heads * config.head_dim
    if family == "gpt2":
        out["wte.weight"], out["wpe.weight"] = sd["tok_emb.weight"], sd["pos_emb.weight"]
        for i in range(config.n_layer):
            h, b = f"h.{i}.", f"blocks.{i}."
            for theirs, mine, conv in GPT2_LAYER:
                w = sd[f"{b}{mine}.weight"]
                out[f"{h}{theirs}.weight"] = w.t() if conv else w
                out[f"{h}{theirs}.bias"] = sd[f"{b}{mine}.bias"]
        out["ln_f.weight"], out["ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(config.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            out[f"{h}input_layernorm.weight"] = sd[f"{b}attn_norm.weight"]
            for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
                q, k, v = sd[f"{b}attn.wqkv.{kind}"].split([config.d_model, kv, kv])
                for p, t in zip("qkv", (q, k, v), strict=True):
                    out[f"{h}self_attn.{p}_proj.{kind}"] = t
            out[f"{h}self_attn.o_proj.weight"] = sd[f"{b}attn.wo.weight"]
            out[f"{h}post_attention_layernorm.weight"] = sd[f"{b}mlp_norm.weight"]
            for p in ("gate", "up", "down"):
                out[f"{h}mlp.{p}_proj.weight"] = sd[f"{b}mlp.{p}.weight"]
        out["model.norm.weight"] = sd["norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _optional_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file; ValueError naming the file otherwise."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not valid JSON: expected an object, found {type(data).__name__}")
    return data


def _token_ids(value: Any, where: Path, key: str) -> list[int]:
    """An HF token id field (absent, an int or a list of ints) as a list."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where}: {key} {value!r} is not a token id or a list of token ids")
    return list(values)


def _token_string(value: Any, where: Path, key: str) -> str | None:
    """An HF special-token field: absent, a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: {key} {value!r} is not a string or a token with content")
    return value


def _chat_template(root: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """chat_template.jinja if present (newer HF dirs), else tokenizer_config.json's chat_template: a string, or a
    list of {name, template} from which the one named "default" (else the first) is taken."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{jinja} cannot be read: {e}") from None
    where = root / "tokenizer_config.json"
    value = tokenizer_config.get("chat_template")
    if isinstance(value, list):
        named = [t for t in value if isinstance(t, dict) and isinstance(t.get("template"), str)]
        if len(named) != len(value):
            raise ValueError(f"{where}: chat_template is a list whose items are not all {{name, template}}")
        value = next((t for t in named if t.get("name") == "default"), named[0])["template"] if named else None
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: chat_template is neither a string nor a list of {{name, template}}")
    return value


def _adds_bos(path: Path) -> bool:
    """Whether tokenizer.json's post-processor puts a special token before the text when encoding."""
    from tokenizers import Tokenizer

    if not path.is_file():
        return False
    try:
        tok = Tokenizer.from_str(path.read_text())
    except Exception as e:  # tokenizers raises its own exception type for a bad file
        raise ValueError(f"{path} is not a valid tokenizer: {' '.join(str(e).split())}") from None
    try:
        with_special = tok.encode("hello").ids
        plain = tok.encode("hello", add_special_tokens=False).ids
    except Exception:  # e.g. a word-level vocabulary without an unknown token: it cannot say, so no BOS
        return False
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return len(with_special) > len(plain) and with_special[0] in special and with_special[1 : 1 + len(plain)] == plain


def read_generation(path: str | Path) -> dict[str, Any]:
    """How to generate with the HF checkpoint in directory `path`, as a JSON-able dict with every key present:

    - `bos_token_id` (int | None), `eos_token_ids` (list[int], maybe empty): from generation_config.json when it
      sets them, else from config.json;
    - `add_bos` (bool): tokenizer.json itself prepends a special token (BOS) when encoding;
    - `bos_token`, `eos_token` (str | None): the strings in tokenizer_config.json, which chat templates use;
    - `chat_template` (str | None): chat_template.jinja, else tokenizer_config.json's chat_template.

    Every file is optional; one that is present but malformed is a ValueError naming it.
    """
    root = Path(path)
    config = _optional_json(root / "config.json") or {}
    generation_config = _optional_json(root / "generation_config.json") or {}
    tokenizer_config = _optional_json(root / "tokenizer_config.json") or {}

    def ids(key: str) -> list[int]:
        for name, data in (("generation_config.json", generation_config), ("config.json", config)):
            if data.get(key) is not None:
                return _token_ids(data[key], root / name, key)
        return []

    bos = ids("bos_token_id")
    where = root / "tokenizer_config.json"
    return {
        "bos_token_id": bos[0] if bos else None,
        "eos_token_ids": ids("eos_token_id"),
        "add_bos": _adds_bos(root / "tokenizer.json"),
        "bos_token": _token_string(tokenizer_config.get("bos_token"), where, "bos_token"),
        "eos_token": _token_string(tokenizer_config.get("eos_token"), where, "eos_token"),
        "chat_template": _chat_template(root, tokenizer_config),
    }


def generation_files(generation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The generation_config.json and tokenizer_config.json that hold `generation` (as read_generation returns
    it), by file name; a file with nothing to hold is left out."""
    files: dict[str, dict[str, Any]] = {}
    gen: dict[str, Any] = {}
    if generation.get("bos_token_id") is not None:
        gen["bos_token_id"] = generation["bos_token_id"]
    eos = list(generation.get("eos_token_ids") or [])
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if gen:
        files["generation_config.json"] = gen
    tok = {k: generation[k] for k in ("bos_token", "eos_token", "chat_template") if generation.get(k) is not None}
    if tok:
        # the tokenizer is tokenizer.json exactly as stored, post-processor included (a Llama tokenizer class
        # would rebuild it from its own add_bos_token default)
        files["tokenizer_config.json"] = {"tokenizer_class": "PreTrainedTokenizerFast", **tok}
    return files


def save_hf(
    model: Transformer,
    path: str | Path,
    tokenizer_json: bytes | None = None,
    generation: dict[str, Any] | None = None,
) -> None:
    """Write config.json, model.safetensors and (if given) tokenizer.json into directory `path`, plus
    generation_config.json and tokenizer_config.json when `generation` holds something for them.

    The directory is created if needed; files in it with the same names are replaced.
    """
    from safetensors.torch import save_file

    config = hf_config(model.config)  # raises before anything is written
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_file(hf_state(model), str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_json is not None:
        (root / "tokenizer.json").write_bytes(tokenizer_json)
    for name, data in generation_files(generation or {}).items():
        (root / name).write_text(json.dumps(data, indent=2) + "\n")
