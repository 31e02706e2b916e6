"""LoRA adapters on every family: identity at start, only A/B train, merge keeps the logits, adapters round-trip."""

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from aifab.nn.config import ModelConfig
from aifab.nn.hf import load_hf, save_hf
from aifab.nn.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_trainable,
    load_lora_state,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)
from aifab.nn.transformer import KVCache, Transformer
from aifab.nn.weights import from_bytes, state_for_save, to_bytes

VOCAB = 64


def small(**family: Any) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, context_len=32, **family)


CONFIGS = {
    "llama": small(tie_embeddings=False),
    "gqa": small(n_kv_heads=2, qkv_bias=True),
    "gpt2": small(norm="layer", mlp="gelu", pos="learned", bias=True),
}
ALL = ("wqkv", "wo", "gate", "up", "down")


def ids(b: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def base_and_lora(family: str, cfg: LoraConfig) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    base = Transformer(CONFIGS[family]).eval()
    lora = Transformer(CONFIGS[family]).eval()
    lora.load_state_dict(base.state_dict())
    apply_lora(lora, cfg)
    return base, lora


def randomise_b(model: nn.Module) -> None:
    """B starts at zero; give it values so the adapters actually change the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 0.05)


@pytest.fixture(params=list(CONFIGS))
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@torch.no_grad()
def test_fresh_adapter_is_identity_and_only_lora_trains(family: str) -> None:
    cfg = LoraConfig(rank=4, targets=ALL)
    base, lora = base_and_lora(family, cfg)
    idx = ids()
    assert torch.equal(base(idx)[0], lora(idx)[0])
    wrapped = [m for m in lora.modules() if isinstance(m, LoraLinear)]
    mc = CONFIGS[family]
    per_layer = 5 if mc.mlp == "swiglu" else 4  # GPT-2 has no gate
    assert len(wrapped) == per_layer * mc.n_layer
    expected = sum(cfg.rank * (m.base.in_features + m.base.out_features) for m in wrapped)
    assert count_trainable(lora) == expected == sum(p.numel() for p in lora_parameters(lora))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)


def test_training_lowers_loss_and_changes_only_adapters(family: str) -> None:
    _, model = base_and_lora(family, LoraConfig(rank=4, alpha=8.0))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = ids(4, 16, seed=2)
    losses = []
    for _ in range(8):
        _, loss = model(x[:, :-1], x[:, 1:])
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())  # base bit-identical
    assert all(not torch.equal(params[n], t) for n, t in start.items())  # every A and B moved


@torch.no_grad()
def test_merge_keeps_logits_and_exports_a_plain_model(family: str, tmp_path: Path) -> None:
    base, model = base_and_lora(family, LoraConfig(rank=2, targets=ALL))
    randomise_b(model)
    idx = ids(seed=3)
    unmerged, _ = model(idx)
    assert not torch.allclose(unmerged, base(idx)[0], atol=1e-4)  # the adapters do something
    merged = merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged(idx)[0], unmerged, rtol=1e-5, atol=1e-5)
    back = from_bytes(to_bytes(merged)).eval()
    torch.testing.assert_close(back(idx)[0], unmerged, rtol=1e-5, atol=1e-5)
    save_hf(merged, tmp_path)  # the HF export of the merged model reloads to the same weights
    config, state = load_hf(tmp_path)
    assert all(torch.equal(state[k], t) for k, t in state_for_save(merged).items())
    hf_back = Transformer(config).eval()
    hf_back.load_state_dict(state, strict=not config.tie_embeddings)
    torch.testing.assert_close(hf_back(idx)[0], unmerged, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward_with_adapters(family: str) -> None:
    _, model = base_and_lora(family, LoraConfig(rank=2, targets=ALL))
    randomise_b(model)
    idx = ids(2, 12, seed=4)
    full, _ = model(idx)
    cache = KVCache(model.config, 2, 12, torch.device("cpu"), torch.float32)
    steps = [model(idx[:, :5], cache=cache, pos=0)[0]]
    steps += [model(idx[:, p : p + 1], cache=cache, pos=p)[0] for p in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_adapter_state_round_trip_and_mismatch() -> None:
    cfg = LoraConfig(rank=3)
    _, trained = base_and_lora("llama", cfg)
    randomise_b(trained)
    state = lora_state_dict(trained)
    assert set(state) == {f"blocks.{i}.attn.{m}.lora_{ab}" for i in range(2) for m in ("wqkv", "wo") for ab in "ab"}
    _, fresh = base_and_lora("llama", cfg)
    idx = ids(seed=5)
    assert not torch.equal(fresh(idx)[0], trained(idx)[0])
    load_lora_state(fresh, state)
    assert torch.equal(fresh(idx)[0], trained(idx)[0])
    bad = dict(state, **{"blocks.0.attn.wo.lora_a": torch.zeros(5, 32)})
    with pytest.raises(ValueError, match=r"blocks.0.attn.wo.lora_a is \[5, 32\], expected \[3, 32\]"):
        load_lora_state(fresh, bad)
    with pytest.raises(ValueError, match="missing"):
        load_lora_state(fresh, {k: v for k, v in state.items() if "wo" not in k})
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state(fresh, dict(state, extra=torch.zeros(1)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "lora.rank must be a positive integer"),
        ({"rank": 2.5}, "lora.rank must be a positive integer"),
        ({"rank": 4, "alpha": 0.0}, "lora.alpha must be a positive number"),
        ({"rank": 4, "targets": ("wq",)}, "lora.targets: unknown 'wq'"),
        ({"rank": 4, "targets": ("lm_head",)}, "unknown 'lm_head'"),
        ({"rank": 4, "targets": ()}, "lora.targets must name at least one"),
        ({"rank": 4, "dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
    ],
)
def test_invalid_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)  # type: ignore[arg-type]


def test_unmatched_targets_and_double_apply_are_refused() -> None:
    with pytest.raises(ValueError, match="match no Linear module"):
        apply_lora(Transformer(CONFIGS["gpt2"]), LoraConfig(rank=2, targets=("gate",)))
    _, model = base_and_lora("llama", LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig(rank=2))


def test_dropout_applies_in_training_only() -> None:
    _, model = base_and_lora("llama", LoraConfig(rank=2, dropout=0.5))
    randomise_b(model)
    idx = ids(seed=6)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(idx)[0], model(idx)[0])
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])
