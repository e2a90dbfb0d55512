"""The search stage across two Ray nodes (ray.cluster_utils.Cluster: two raylets on this machine)."""

from __future__ import annotations

from pathlib import Path

from stage_callbacks import NodeLog

from components.config import PipelineConfig
from components.driver import prepare
from components.search import run_search_stage
from nas.config import load_config


def test_one_worker_on_each_of_two_nodes_completes(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    try:
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        overrides = ["search.epochs=1", "search.steps_per_epoch=2", "search.batch_size=8", "search.layers=3"]
        overrides += ["search.channels=4", "search.nodes=2", "search.primitives=[none, skip_connect, sep_conv_3x3]"]
        overrides += ["data.limit=200", "ray.num_workers=2", "ray.cpus_per_worker=1"]
        cfg = load_config("digits", [*overrides, f"ray.storage_path={tmp_path / 'store'}"], model=PipelineConfig)
        result = run_search_stage(prepare(cfg), name="two-nodes", callback=NodeLog(nodes))
    finally:
        ray.shutdown()
        cluster.shutdown()
    placed = {p.name: p.read_text() for p in nodes.iterdir()}
    assert set(placed) == {"rank_0", "rank_1"}
    assert placed["rank_0"] != placed["rank_1"]
    assert [row.epoch for row in result.history] == [1]
    assert result.outputs.exists("genotype.json")
