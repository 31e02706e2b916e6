"""The Ray executor runs the same ingest on Ray Data and must agree with the local executor byte for byte."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from aifab.data.ingest import ingest
from aifab.spec import DataSpec
from aifab.store import Store
from aifab.store.schema import DatasetVersion
from helpers import TINY_TOKENIZER, write_corpus

ray = pytest.importorskip("ray")
# Ray Data warns about its own deprecated context fields while it copies its context; nothing of ours is involved
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")]


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[None]:
    """A head and a worker node on this machine, one CPU each, so map tasks really spread over nodes.

    Ray binds its nodes to this machine's own interface address (it refuses loopback for clusters), so all
    traffic stays on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_local_and_ray_executors_agree(two_node_cluster: None, store: Store, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", n_files=20)
    (corpus / "dup.py").write_text((corpus / "module_0.py").read_text())  # the dedup must agree too
    spec = DataSpec(sources=[str(corpus)], val_fraction=0.2)
    local = ingest(store, "local", spec, TINY_TOKENIZER)
    on_ray = ingest(store, "ray", spec, TINY_TOKENIZER, executor="ray")
    with store.db.session() as s:
        a, b = s.get(DatasetVersion, local.dataset_version_id), s.get(DatasetVersion, on_ray.dataset_version_id)
        assert a is not None and b is not None
        assert (a.manifest_digest, a.curated_digest, a.tokenizer_digest) == (
            b.manifest_digest,
            b.curated_digest,
            b.tokenizer_digest,
        )
        assert (a.executor, b.executor) == ("local", "ray")
    assert local.stages == on_ray.stages
    assert local.stages["exact_dedup"]["docs_in"] - local.stages["exact_dedup"]["docs_out"] == 1
