import math

import pytest
import torch

from aifab.nn.config import PRESETS, ModelConfig
from aifab.nn.transformer import KVCache, Transformer, num_params

CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, context_len=16)


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (b, t), generator=g)


def new_cache(model: Transformer, batch: int, max_len: int | None = None) -> KVCache:
    return KVCache(model.config, batch, max_len or model.config.context_len, torch.device("cpu"), torch.float32)


# --- forward ---------------------------------------------------------------------------------------------------


def test_forward_shapes_and_loss_only_with_targets(model: Transformer) -> None:
    idx = tokens(3, 10)
    logits, loss = model(idx)
    assert logits.shape == (3, 10, CFG.vocab_size)
    assert loss is None
    logits2, loss2 = model(idx, targets=tokens(3, 10, seed=2))
    assert logits2.shape == (3, 10, CFG.vocab_size)
    assert loss2 is not None and loss2.shape == () and torch.isfinite(loss2)


def test_loss_at_init_is_about_ln_vocab(model: Transformer) -> None:
    _, loss = model(tokens(4, CFG.context_len), targets=tokens(4, CFG.context_len, seed=3))
    assert loss is not None
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.1


def test_attention_is_causal(model: Transformer) -> None:
    idx = tokens(2, 12)
    changed = idx.clone()
    t = 7
    changed[:, t] = (changed[:, t] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t], b[:, t])  # the changed position itself does see its token


def test_forward_beyond_context_raises(model: Transformer) -> None:
    with pytest.raises(ValueError, match="context length 16"):
        model(tokens(1, CFG.context_len + 1))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(tokens(1, 2), cache=new_cache(model, 1), pos=CFG.context_len - 1)
    model(tokens(1, CFG.context_len))  # exactly the context is fine


# --- KV cache --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_prefill_then_one_token_at_a_time_matches_full_forward(model: Transformer) -> None:
    idx = tokens(2, CFG.context_len)
    full, _ = model(idx)
    cache = new_cache(model, 2)
    prefill = 5
    first, _ = model(idx[:, :prefill], cache=cache, pos=0)
    steps = [first]
    for pos in range(prefill, CFG.context_len):
        out, _ = model(idx[:, pos : pos + 1], cache=cache, pos=pos)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_chunked_prefill_matches_full_forward(model: Transformer) -> None:
    idx = tokens(2, CFG.context_len)
    full, _ = model(idx)
    cache = new_cache(model, 2)
    outs, pos = [], 0
    for size in (3, 4, 1, 6, 2):  # several chunks with pos > 0 and T > 1
        out, _ = model(idx[:, pos : pos + size], cache=cache, pos=pos)
        outs.append(out)
        pos += size
    assert pos == CFG.context_len
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cache_only_as_long_as_needed(model: Transformer) -> None:
    idx = tokens(1, 6)
    full, _ = model(idx)
    cache = new_cache(model, 1, max_len=6)
    a, _ = model(idx[:, :4], cache=cache, pos=0)
    b, _ = model(idx[:, 4:], cache=cache, pos=4)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, rtol=1e-5, atol=1e-5)


# --- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_head": 4}, r"d_model \(30\) must be divisible by model.n_head \(4\)"),
        ({"d_model": 12, "n_head": 4}, "must be even"),  # head size 3
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"n_head": 0}, "n_head must be a positive integer"),
        ({"context_len": -1}, "context_len must be a positive integer"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"d_model": 32.0}, "d_model must be a positive integer"),
        ({"ffn_hidden": -1}, "ffn_hidden must be >= 0"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"vocab_size": 64, "n_layer": 2, "n_head": 2, "d_model": 32, **kwargs}
    with pytest.raises(ValueError, match=message):
        ModelConfig(**args)  # type: ignore[arg-type]


def test_config_dict_round_trip_and_unknown_keys() -> None:
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="unknown model config keys: bogus, n_embd"):
        ModelConfig.from_dict({**CFG.to_dict(), "n_embd": 32, "bogus": 1})


def test_presets_are_valid_and_scale_with_vocab() -> None:
    for preset in PRESETS.values():
        cfg = preset(1000)
        assert cfg.vocab_size == 1000 and cfg.head_dim % 2 == 0
    assert CFG.hidden % 64 == 0 and CFG.hidden >= 8 * CFG.d_model // 3


# --- parameters and training -----------------------------------------------------------------------------------


def test_tied_embeddings_share_storage(model: Transformer) -> None:
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    untied = Transformer(ModelConfig(**{**CFG.to_dict(), "tie_embeddings": False}))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert num_params(untied) - num_params(model) == CFG.vocab_size * CFG.d_model
    assert num_params(model) == sum(p.numel() for p in model.parameters())  # parameters() also dedups


def test_tied_embeddings_stay_tied_through_training(model: Transformer) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, loss = model(tokens(2, 8), targets=tokens(2, 8, seed=5))
    assert loss is not None
    loss.backward()
    opt.step()
    assert model.lm_head.weight is model.tok_emb.weight


def test_a_few_optimizer_steps_reduce_loss_on_a_fixed_batch(model: Transformer) -> None:
    model.train()
    idx, targets = tokens(4, CFG.context_len), tokens(4, CFG.context_len, seed=9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        _, loss = model(idx, targets=targets)
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
