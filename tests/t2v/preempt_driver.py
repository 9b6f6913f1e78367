"""Driver of `test_distributed.py::test_ray_train_rides_out_a_node_preemption` (a process joins
one Ray cluster only, so this runs as a subprocess of the test).

A local 3-node Ray (`ray.cluster_utils.Cluster`: a head without CPUs, two nodes with 2 CPUs)
runs `hdvg train --ray-address ... --ray-workers 2`. Once the run has logged step AFTER, the
node its workers run on is drained for preemption with a deadline DEADLINE_S seconds away --
what a cloud's spot reclaim does through the autoscaler -- and the node stays up past it, as
Ray Train's own tests do. Ray Train's watcher hands the notice to the workers, tears them
down at the deadline and starts them again on the other node.

    python -m tests.t2v.preempt_driver CONFIG SHARDS RUN STEPS AFTER DEADLINE_S

Prints one JSON line: {"rc": exit code of `hdvg train`, "drained": node id, "at_step": the
last step logged when the drain was asked}.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(x)["step"] for x in lines if x.strip()), default=0)


def drain_when(run: Path, after: int, deadline_s: float, out: dict) -> None:
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.util.state import list_actors

    while last_step(run) < after:
        time.sleep(0.1)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    node = workers[0].node_id
    assert all(w.node_id == node for w in workers), workers  # one node holds both ranks
    gcs = ray._private.worker.global_worker.gcs_client
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    deadline_ms = int((time.time() + deadline_s) * 1000)
    accepted, why = gcs.drain_node(node, reason, "test: spot reclaim", deadline_ms)
    assert accepted, why
    out |= {"drained": node, "at_step": last_step(run)}


def main(argv: list[str]) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from hdvg.cli import main as hdvg

    config, shards, run, steps, after, deadline_s = argv
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        out: dict = {}
        watcher = threading.Thread(
            target=drain_when, args=(Path(run), int(after), float(deadline_s), out), daemon=True
        )
        watcher.start()
        rc = hdvg(
            ["train", config, "--shards", shards, "--output", run, "--steps", steps,
             "--ray-address", cluster.address, "--ray-workers", "2",
             "--ray-cpus-per-worker", "1"]
        )  # fmt: skip
        print(json.dumps({"rc": rc} | out), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
