"""Each family (Llama with GQA, Mistral, Qwen2, GPT-2) against `transformers`: logits within 1e-4 in fp32.

Small randomly initialised HF models are saved with save_pretrained (safetensors), imported with load_hf, and
exported again with save_hf for transformers to load. Biases are randomised too, so a dropped bias shows.
"""

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from aifab.nn.config import ModelConfig
from aifab.nn.hf import load_hf, save_hf
from aifab.nn.transformer import KVCache, Transformer

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]
VOCAB, CTX = 128, 64
ATOL = 1e-4


def hf_model(family: str) -> Any:
    """A 2-layer, 64-wide, 4-head model (2 key/value heads where the family has them), random weights and biases."""
    llama_like = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": CTX,
    }
    if family == "llama":  # untied head and a non-default rope theta
        config = transformers.LlamaConfig(**llama_like, tie_word_embeddings=False, rope_theta=500000.0)
    elif family == "mistral":
        config = transformers.MistralConfig(**llama_like, sliding_window=CTX, tie_word_embeddings=False)
    elif family == "qwen2":  # q/k/v biases, tied head
        config = transformers.Qwen2Config(**llama_like, tie_word_embeddings=True)
    else:
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=CTX, bos_token_id=0, eos_token_id=0
        )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF initialises biases and norms to constants: perturb everything
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def ids(b: int = 2, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def ours(path: Path) -> Transformer:
    config, state = load_hf(path)
    model = Transformer(config)
    model.load_state_dict(state, strict=not config.tie_embeddings)
    return model.eval()


@torch.no_grad()
def max_diff(hf: Any, model: Transformer, idx: torch.Tensor) -> float:
    return float((hf(idx).logits - model(idx)[0]).abs().max())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return request.param, hf, path


def test_import_matches_transformers(family: tuple[str, Any, Path]) -> None:
    name, hf, path = family
    model = ours(path)
    assert max_diff(hf, model, ids()) < ATOL
    cfg = model.config
    if name == "gpt2":
        assert (cfg.norm, cfg.mlp, cfg.pos, cfg.bias, cfg.tie_embeddings) == ("layer", "gelu", "learned", True, True)
    else:
        assert (cfg.norm, cfg.mlp, cfg.pos, cfg.kv_heads) == ("rms", "swiglu", "rope", 2)
        assert cfg.qkv_bias == (name == "qwen2")
        assert cfg.sliding_window == (CTX if name == "mistral" else None)
    if name == "llama":
        assert cfg.rope_theta == 500000.0 and not cfg.tie_embeddings


def test_sharded_checkpoint_matches_transformers(family: tuple[str, Any, Path], tmp_path: Path) -> None:
    _, hf, _ = family
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert max_diff(hf, ours(tmp_path), ids(seed=2)) < ATOL


def test_export_loads_in_transformers(family: tuple[str, Any, Path], tmp_path: Path) -> None:
    name, _, path = family
    model = ours(path)
    save_hf(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.model_type == name
    idx = ids(seed=3)
    assert max_diff(back, model, idx) < ATOL
    again = ours(tmp_path).state_dict()  # ours -> HF -> ours is exact
    assert all(torch.equal(t, again[k]) for k, t in model.state_dict().items())


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward(family: tuple[str, Any, Path]) -> None:
    model = ours(family[2])
    idx = ids(2, 20, seed=4)
    full, _ = model(idx)
    cache = KVCache(model.config, 2, 20, torch.device("cpu"), torch.float32)
    assert cache.k[0].shape[1] == model.config.kv_heads  # GQA: the cache holds key/value heads only
    steps = [model(idx[:, :7], cache=cache, pos=0)[0]]
    steps += [model(idx[:, p : p + 1], cache=cache, pos=p)[0] for p in range(7, 12)]
    steps.append(model(idx[:, 12:], cache=cache, pos=12)[0])  # a chunk with pos > 0
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sliding_window_longer_sequences_are_refused() -> None:
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=32, sliding_window=8)).eval()
    model(ids(1, 8))
    with pytest.raises(ValueError, match="sliding window 8"):
        model(ids(1, 9))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_kv_heads": 3}, r"n_head \(4\) must be divisible by model.n_kv_heads \(3\)"),
        ({"n_kv_heads": 0}, "n_kv_heads must be a positive integer or null"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer or null"),
        ({"norm": "batch"}, "norm must be one of rms, layer"),
        ({"mlp": "relu"}, "mlp must be one of swiglu, gelu"),
        ({"pos": "alibi"}, "pos must be one of rope, learned"),
    ],
)
def test_family_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=64, n_layer=1, n_head=4, d_model=32, **kwargs)  # type: ignore[arg-type]


def test_learned_positions_allow_odd_head_size_and_gelu_mlp_is_4x() -> None:
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=4, d_model=12, pos="learned", mlp="gelu", norm="layer")
    assert cfg.head_dim == 3 and cfg.hidden == 48
    logits, _ = Transformer(cfg)(ids(1, 5))
    assert logits.shape == (1, 5, VOCAB)
