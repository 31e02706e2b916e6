import json
import pickle

import pytest
import torch

from aifab.nn.config import ModelConfig
from aifab.nn.transformer import Transformer
from aifab.nn.weights import CONFIG_KEY, config_from_bytes, from_bytes, state_for_save, to_bytes

CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, context_len=16)


def build(cfg: ModelConfig = CFG, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def header(data: bytes) -> dict[str, object]:
    n = int.from_bytes(data[:8], "little")
    parsed: dict[str, object] = json.loads(data[8 : 8 + n])
    return parsed


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_logits(tied: bool) -> None:
    cfg = ModelConfig(**{**CFG.to_dict(), "tie_embeddings": tied})
    model = build(cfg)
    loaded = from_bytes(to_bytes(model)).eval()
    assert loaded.config == cfg
    idx = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tied


def test_config_travels_in_the_metadata() -> None:
    data = to_bytes(build())
    assert config_from_bytes(data) == CFG
    meta = header(data)["__metadata__"]
    assert isinstance(meta, dict)
    assert json.loads(meta[CONFIG_KEY]) == CFG.to_dict()


def test_tied_head_is_saved_once() -> None:
    data = to_bytes(build())
    assert "lm_head.weight" not in header(data)
    assert "tok_emb.weight" in header(data)


def test_bytes_are_safetensors_and_loading_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    data = to_bytes(build())
    # safetensors: an 8-byte little-endian header length, then a JSON header; a pickle would start with 0x80
    assert data[0] != 0x80 and data[8:9] == b"{"
    assert set(header(data)) - {"__metadata__"} == set(state_for_save(build()))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling is forbidden")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert from_bytes(data).config == CFG


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01",
        b"not a weights file at all, just some text",
        (10**9).to_bytes(8, "little") + b'{"a": 1}',  # header length past the end
        pickle.dumps({"tok_emb.weight": [1.0, 2.0]}),
    ],
    ids=["empty", "tiny", "text", "huge-header", "pickle"],
)
def test_garbage_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        from_bytes(data)
    with pytest.raises(ValueError):
        config_from_bytes(data)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_bytes_raise_value_error(keep: float) -> None:
    data = to_bytes(build())
    with pytest.raises(ValueError, match="not a valid safetensors"):
        from_bytes(data[: int(len(data) * keep)])


def test_weights_without_config_raise_value_error() -> None:
    from safetensors.torch import save

    data = save(state_for_save(build()))
    with pytest.raises(ValueError, match="no aifab model config"):
        config_from_bytes(data)
    with pytest.raises(ValueError, match="no aifab model config"):
        from_bytes(data)
    assert from_bytes(data, config=CFG).config == CFG  # an explicit config is enough


def test_mismatched_tensor_names_raise_value_error() -> None:
    from safetensors.torch import save

    state = state_for_save(build())
    state["blocks.0.attn.wqkv.weightt"] = state.pop("blocks.0.attn.wqkv.weight")
    data = save(state, metadata={CONFIG_KEY: json.dumps(CFG.to_dict())})
    with pytest.raises(ValueError, match=r"missing \['blocks.0.attn.wqkv.weight'\].*weightt"):
        from_bytes(data)


def test_weights_for_another_shape_raise_value_error() -> None:
    data = to_bytes(build())
    deeper = ModelConfig(**{**CFG.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match="missing"):
        from_bytes(data, config=deeper)
    wider = ModelConfig(**{**CFG.to_dict(), "d_model": 48, "n_head": 2})  # same names, other shapes
    with pytest.raises(ValueError):
        from_bytes(data, config=wider)


def test_bad_config_in_metadata_raises_value_error() -> None:
    from safetensors.torch import save

    bad = {**CFG.to_dict(), "n_head": 3}  # 32 is not divisible by 3
    data = save(state_for_save(build()), metadata={CONFIG_KEY: json.dumps(bad)})
    with pytest.raises(ValueError, match="divisible"):
        from_bytes(data)
