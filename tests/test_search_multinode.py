"""The search stage across two Ray nodes (ray.cluster_utils.Cluster: raylets on this machine), one of them lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from stage_callbacks import StallOffNode

from components.config import PipelineConfig
from components.driver import prepare
from components.search import run_search_stage
from nas.config import load_config


def test_a_lost_node_is_replaced_and_the_search_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """One worker on each of two nodes. Mid-search the node of one worker is removed and another joins: the group
    restarts from its last checkpoint, redoes the lost epoch and finishes with the undisturbed run's every epoch, bit
    for bit (the epoch after the redone one too: no RNG draw differs between a resumed worker and an undisturbed one).
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    lost = cluster.add_node(num_cpus=1)
    folder = tmp_path / "nodes"
    folder.mkdir()
    outcome: dict = {}
    try:
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        head = ray.get_runtime_context().get_node_id()  # the driver's node, where Train's controller runs
        overrides = ["search.epochs=3", "search.steps_per_epoch=2", "search.batch_size=8", "search.layers=3"]
        overrides += ["search.channels=4", "search.nodes=2", "search.primitives=[none, skip_connect, sep_conv_3x3]"]
        overrides += ["data.limit=200", "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.max_failures=2"]
        cfg = load_config("digits", [*overrides, f"ray.storage_path={tmp_path / 'store'}"], model=PipelineConfig)
        prepared = prepare(cfg)
        straight = run_search_stage(prepared, name="straight")

        def search() -> None:
            try:
                outcome["result"] = run_search_stage(
                    prepared, name="lost-node", callback=StallOffNode(folder, head, epoch=2)
                )
            except BaseException as err:  # noqa: BLE001 - reported below, in the test's thread
                outcome["error"] = err

        worker = threading.Thread(target=search)
        worker.start()
        deadline = time.monotonic() + 300
        while not (folder / "stalled").exists() and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (folder / "stalled").exists(), outcome.get("error")
        cluster.remove_node(lost)  # its raylet and the worker on it are gone
        (folder / "removed").write_text("")
        cluster.add_node(num_cpus=1)  # a replacement, as an autoscaler would add
        worker.join(timeout=600)
        assert not worker.is_alive()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "error" not in outcome, outcome.get("error")
    recovered = outcome["result"]
    placed = {p.name: p.read_text().split() for p in folder.glob("rank_*")}
    assert set(placed) == {"rank_0", "rank_1"}
    assert placed["rank_0"][0] != placed["rank_1"][0]  # one worker per node
    assert len(placed["rank_0"]) + len(placed["rank_1"]) == 4  # the group started twice
    assert [row.epoch for row in recovered.history] == [1, 2, 3]
    # every epoch (before the loss, the redone one, the one after) is the undisturbed run's exactly
    assert [(row.alpha_normal, row.alpha_reduce, row.train_loss, row.val_loss) for row in recovered.history] == [
        (row.alpha_normal, row.alpha_reduce, row.train_loss, row.val_loss) for row in straight.history
    ]
    assert recovered.genotype == straight.genotype
    assert recovered.outputs.exists("genotype.json")
