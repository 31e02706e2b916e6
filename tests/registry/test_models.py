import pytest
from sqlalchemy import select

from aifab.errors import AifabError, ArtifactError, NotFound
from aifab.registry.models import aliases_of, list_versions, register, resolve, set_alias
from aifab.store import Store
from aifab.store.lineage import upstream
from aifab.store.schema import LineageEdge
from helpers import dataset_row


def _register(store: Store, name: str = "m", **kw: object) -> int:
    weights = store.artifacts.put_bytes(b"weights " + name.encode())
    tok = store.artifacts.put_bytes(b"tokenizer")
    mv = register(
        store, name, weights_digest=weights, tokenizer_digest=tok, config={}, params_count=1, metrics={}, **kw
    )  # type: ignore[arg-type]
    return mv.version


def test_versions_count_up_per_name(store: Store) -> None:
    assert [_register(store), _register(store), _register(store, "other")] == [1, 2, 1]
    assert [(m.name, m.version) for m in list_versions(store)] == [("m", 1), ("m", 2), ("other", 1)]
    assert [m.version for m in list_versions(store, "m")] == [1, 2]


def test_resolve_by_name_version_and_alias(store: Store) -> None:
    _register(store, aliases=("prod",))
    _register(store)
    assert resolve(store, "m").version == 2
    assert resolve(store, "m:1").version == 1
    assert resolve(store, "m@prod").version == 1
    set_alias(store, "m:2", "prod")
    assert resolve(store, "m@prod").version == 2
    assert aliases_of(store, resolve(store, "m:2").id) == ["prod"]


@pytest.mark.parametrize("ref", ["nope", "m:9", "m@missing"])
def test_unknown_models_name_what_exists(store: Store, ref: str) -> None:
    _register(store)
    with pytest.raises(NotFound, match=r"unknown model .*registered models: m"):
        resolve(store, ref)


def test_empty_registry_says_so(store: Store) -> None:
    with pytest.raises(NotFound, match="no models are registered yet"):
        resolve(store, "demo")


@pytest.mark.parametrize("ref", ["../x", "m:0", "m:latest", "m@", ""])
def test_malformed_references_are_rejected(store: Store, ref: str) -> None:
    with pytest.raises(AifabError, match="invalid"):
        resolve(store, ref)


def test_registering_weights_not_in_the_store_fails_and_stores_nothing(store: Store) -> None:
    tok = store.artifacts.put_bytes(b"tokenizer")
    with pytest.raises(ArtifactError, match="missing"):
        register(store, "m", weights_digest="0" * 64, tokenizer_digest=tok, config={}, params_count=1, metrics={})
    assert list_versions(store) == []


def test_lineage_links_the_model_to_its_run_and_dataset(store: Store) -> None:
    from aifab.store.schema import Run

    with store.db.session() as s:
        ds = dataset_row(name="d")
        s.add(ds)
        s.add(Run(id="run1", kind="train", status="completed", params={}, summary={}))
        s.flush()
        ds_id = ds.id
    _register(store, run_id="run1", dataset_version_id=ds_id)
    mv = resolve(store, "m")
    with store.db.session() as s:
        assert set(upstream(s, "model", mv.id)) == {("run", "run1", "produced"), ("dataset", str(ds_id), "trained_on")}
        assert len(s.scalars(select(LineageEdge)).all()) == 2


def test_generation_settings_are_stored_and_default_to_empty(store: Store) -> None:
    generation = {"bos_token_id": 1, "eos_token_ids": [2, 7], "add_bos": True, "chat_template": "{{ x }}"}
    _register(store, "chat", generation=generation)
    _register(store, "plain")
    assert resolve(store, "chat:1").generation == {
        "bos_token_id": 1,
        "eos_token_ids": [2, 7],
        "add_bos": True,
        "chat_template": "{{ x }}",
    }
    assert resolve(store, "plain:1").generation == {}
