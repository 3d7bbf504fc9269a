"""The job on a multi-node Ray cluster shaped like the KubeRay RayCluster (deploy/kuberay/base/raycluster.yaml):
a head with no custom resources and one node per worker group, advertising rvpo_rollout / rvpo_learner /
rvpo_judge. All nodes run on this machine (ray.cluster_utils.Cluster).

The first test runs the job and, while it runs, checks where every actor lives, grows the judge pool onto
an added judge node (rvpo-async scale-judges), shrinks it, and removes the judge node that holds the one
worker left, as when a judge pod is preempted: the run loses no reward entry and no group. The second drives
a JudgePool directly with a slow judge, grows it onto an added judge node and checks that each of its three
workers scores part of the next backlog (the throughput it prints is for reading, not asserted).

A judge node here offers two judge slots ({rvpo_judge: 2}), not the four of the KubeRay judge pod: a judge
worker asks for rvpo_judge 1, so a pool of three no longer fits one judge node and the third worker can only
start on the node added for it. With four slots Ray's scheduler may put every new worker on the first node.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle

from judge_fakes import EXTRA_BUILDERS
from ports import free_ports
from rvpo_async.config import Config, JudgesConfig, JudgeSpec, load_config
from rvpo_async.types import Prompt, RolloutGroup, Sample

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# the test-only judge below and the node-id probe travel to the workers by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")
SMALL = ["rollout.group_size=4", "rollout.groups_per_step=4", "rollout.max_new_tokens=12", "rollout.compile=false",
         "metrics.enabled=false", "run.progress=false", "learner.micro_batch_size=16", "checkpoint.every=0"]
RAY_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
JUDGE_NODE = {"rvpo_judge": 2}
# the node group each actor class belongs on (JudgeWorker is ray.remote(SampleScorer)); the buffer, the judge
# service and the run control stay with the driver, on the head
ROLES = {"StreamingRollout": "rollout", "LearnerRank": "learner", "SampleScorer": "judge",
         "BufferService": "head", "JudgeService": "head", "RunControl": "head"}
STEPS = 50
GROW_AT_STEP = 2


# ---------------------------------------------------------------------------------------------- the cluster
class MultiNode:
    """The Cluster and the role of every node it ever had (removed nodes keep theirs)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.roles: dict[str, str] = {cluster.head_node.node_id: "head"}
        self.judge_nodes: list[Any] = []
        self.lock = threading.Lock()

    def add(self, role: str, resources: dict[str, float]) -> Any:
        # A node started off the main thread cannot install Ray's SIGTERM handler (signal.signal works in the
        # main thread only): it skips the exit hooks, and the fixture's cluster.shutdown() stops it.
        hooks = self.cluster._shutdown_at_exit
        self.cluster._shutdown_at_exit = hooks and threading.current_thread() is threading.main_thread()
        try:
            node = self.cluster.add_node(num_cpus=1, resources=resources)
        finally:
            self.cluster._shutdown_at_exit = hooks
        with self.lock:
            self.roles[node.node_id] = role
            if role == "judge":
                self.judge_nodes.append(node)
        return node

    def add_judge_node(self) -> Any:
        return self.add("judge", JUDGE_NODE)

    def remove_judge_node(self, node: Any) -> None:
        with self.lock:
            self.judge_nodes.remove(node)
        self.cluster.remove_node(node)

    def role_of(self, node_id: str) -> str:
        with self.lock:
            return self.roles.get(node_id, "unknown")


@pytest.fixture(scope="module")
def multinode():
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local instance (tests/conftest.py ray_local starts a new one when needed)
    gcs, dash, agent = free_ports(range(21600, 21700), 3)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, gcs_server_port=gcs, include_dashboard=True,
                                                                dashboard_port=dash, dashboard_agent_listen_port=agent))
    try:
        # the Cluster records its address as this machine's current Ray cluster, which a plain ray.init() in
        # another process would then join; this test connects by address, so the record goes
        if ray._private.utils.read_ray_address() == cluster.gcs_address:
            ray._common.utils.reset_ray_address()
        mn = MultiNode(cluster)
        mn.add("rollout", {"rvpo_rollout": 1})
        mn.add("learner", {"rvpo_learner": 1})
        mn.add_judge_node()
        ray.init(address=cluster.address, namespace="rvpo", runtime_env={"env_vars": dict(RAY_ENV)})
        yield mn
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def one_judge_node(multinode: MultiNode):
    """Each test starts and ends with a single judge node, whichever one it is."""
    while len(multinode.judge_nodes) > 1:
        multinode.remove_judge_node(multinode.judge_nodes[-1])
    yield multinode
    while len(multinode.judge_nodes) > 1:
        multinode.remove_judge_node(multinode.judge_nodes[-1])


def actor_nodes(address: str) -> list[tuple[str, str, str, str]]:
    """(class name, actor id, node id, state) of every placed actor the cluster at `address` knows of (named:
    without it the state API looks for the machine's one Ray instance, and fails when there are two)."""
    from ray.util.state import list_actors

    return [(a.class_name, a.actor_id, a.node_id, a.state)
            for a in list_actors(address=address, limit=10_000, raise_on_missing_output=False) if a.node_id]


def node_of(handle: Any) -> str:
    return ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)


# ---------------------------------------------------------------------------------------------- the training run
def rows_of(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.is_file() else []


@dataclasses.dataclass
class Watch:
    """What the watcher saw: placement violations, the nodes each actor kind ran on, judge workers alive over
    time, and the completed step at which each event happened."""

    violations: list[str] = dataclasses.field(default_factory=list)
    placed: dict[str, set[str]] = dataclasses.field(default_factory=lambda: {r: set() for r in ROLES.values()})
    judge_counts: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (step, alive judge workers)
    events: dict[str, int] = dataclasses.field(default_factory=dict)  # event -> completed steps at that moment
    run_id: str = ""
    added_node: str = ""
    new_node_judges: int = 0
    removed_node: str = ""
    removed_was: str = ""  # "added" or "original" judge node
    replaced_on: str = ""
    error: str = ""


class Watcher:
    """While the run goes on: checks placement, grows the judge pool onto an added judge node, shrinks it,
    then removes the judge node that holds the one worker left (a preempted judge pod), which the pool
    replaces on the other judge node."""

    def __init__(self, mn: MultiNode, run_dir: Path) -> None:
        self.mn, self.run_dir = mn, run_dir
        self.w = Watch()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="multinode-watcher", daemon=True)

    def _alive_judges(self) -> Counter:
        """Checks placement of every actor seen so far; returns alive judge workers per node."""
        alive: Counter = Counter()
        for cls, aid, node, state in actor_nodes(self.mn.cluster.address):
            role = ROLES.get(cls)
            if role is None:
                continue
            self.w.placed[role].add(node)
            where = self.mn.role_of(node)
            if where != role:
                msg = f"{cls} {aid[:8]} on a {where} node {node[:8]}"
                if msg not in self.w.violations:
                    self.w.violations.append(msg)
            if role == "judge" and state == "ALIVE":
                alive[node] += 1
        steps = len(rows_of(self.run_dir))
        total = sum(alive.values())
        if not self.w.judge_counts or self.w.judge_counts[-1][1] != total:
            self.w.judge_counts.append((steps, total))
        return alive

    def _until(self, cond: Any, what: str, budget_s: float = 180.0) -> Counter:
        end = time.monotonic() + budget_s
        while not self.stop.is_set():
            alive = self._alive_judges()
            if cond(alive):
                return alive
            if time.monotonic() > end:
                raise TimeoutError(f"{what}: not within {budget_s:g}s; judge workers per node {dict(alive)}")
            time.sleep(0.5)
        raise InterruptedError(f"the run ended before: {what}")

    def _mark(self, event: str) -> None:
        self.w.events[event] = len(rows_of(self.run_dir))

    def _main(self) -> None:
        from actors.control import find_controls, scale_judges

        try:
            def run_found(_: Counter) -> bool:
                runs = find_controls()
                if runs:
                    self.w.run_id = runs[0][: -len("-control")]
                return bool(runs) and len(rows_of(self.run_dir)) >= GROW_AT_STEP

            self._until(run_found, f"the run's control actor and {GROW_AT_STEP} steps", budget_s=300)
            self._mark("grow_requested")
            new = self.mn.add_judge_node()
            self.w.added_node = new.node_id
            scale_judges(3, self.w.run_id)
            alive = self._until(lambda a: sum(a.values()) == 3 and a[new.node_id] > 0,
                                "3 judge workers, one or more on the added node")
            self.w.new_node_judges = alive[new.node_id]
            self._mark("grown")

            scale_judges(1, self.w.run_id)
            self._mark("shrink_requested")
            alive = self._until(lambda a: sum(a.values()) == 1, "1 judge worker")
            self._mark("shrunk")

            (busy,) = [n for n in self.mn.judge_nodes if alive[n.node_id] > 0]
            (other,) = [n for n in self.mn.judge_nodes if n is not busy]
            self.w.removed_node = busy.node_id
            self.w.removed_was = "added" if busy.node_id == new.node_id else "original"
            self.mn.remove_judge_node(busy)
            self._mark("node_removed")
            self._until(lambda a: sum(a.values()) == 1 and a[other.node_id] == 1,
                        "the lost judge worker replaced on the other judge node")
            self.w.replaced_on = other.node_id
            self._mark("replaced")
            while not self.stop.wait(0.5):
                self._alive_judges()
        except InterruptedError as e:
            self.w.error = str(e)
        except Exception as e:  # reported by the test
            self.w.error = f"{type(e).__name__}: {e}"


def test_run_keeps_actors_on_their_node_groups_and_follows_judge_scaling(tmp_path, tiny_model_dir, one_judge_node):
    from rvpo_async.driver import train

    mn = one_judge_node
    run = tmp_path / "run"
    cfg = load_config(CONFIG, SMALL + [
        f"run.output_dir={run}", f"model.path={tiny_model_dir}", "run.mode=async", f"run.steps={STEPS}",
        "learner.master_port=21610", "rollout.resources={rvpo_rollout: 1}", "learner.resources={rvpo_learner: 1}",
        "judges.resources={rvpo_judge: 1}", "judges.num_workers=1", "judges.min_workers=1", "judges.max_workers=4"])
    assert cfg.rollout.num_cpus == 1 and cfg.learner.num_cpus == 1 and cfg.judges.num_cpus == 0.25
    watcher = Watcher(mn, run)
    watcher.thread.start()
    t0 = time.monotonic()
    try:
        report = train(cfg)
    finally:
        watcher.stop.set()
        watcher.thread.join(timeout=120)
    wall = time.monotonic() - t0
    w = watcher.w
    print(f"\nmultinode run: {wall:.0f}s; events at steps {w.events}; judge workers (step, n) {w.judge_counts}; "
          f"removed the {w.removed_was} judge node")

    # the run completed; the scaling and the node loss happened during it, and it went on after them
    assert not w.error, f"watcher: {w.error}; events {w.events}"
    rows = rows_of(run)
    assert report["steps"] == STEPS and [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert w.events["replaced"] < STEPS, f"the run ended before the lost judge worker was replaced: {w.events}"

    # placement: every actor kind only on its own node group; the buffer and run control with the driver
    assert not w.violations, w.violations
    assert {mn.role_of(n) for n in w.placed["rollout"]} == {"rollout"}
    assert {mn.role_of(n) for n in w.placed["learner"]} == {"learner"}
    assert {mn.role_of(n) for n in w.placed["judge"]} == {"judge"}
    assert w.placed["head"] == {ray.get_runtime_context().get_node_id()}
    assert w.added_node in w.placed["judge"] and w.new_node_judges >= 1
    assert w.replaced_on != w.removed_node

    # the pool followed the requests: 1 -> 3 -> 1 worker, and 1 again after the node loss
    # from the pool's first worker on, up to the last step (the pool is shut down once training ends, and
    # the watcher may see that before the run returns)
    counts = [n for s, n in w.judge_counts if s < STEPS]
    counts = counts[next(i for i, n in enumerate(counts) if n):]
    assert counts[0] == 1 and max(counts) == 3 and counts[-1] == 1, w.judge_counts
    grown = counts.index(3)
    assert 1 in counts[grown:], w.judge_counts
    js = report["judges"]
    # (work still queued or in flight at the end belongs to groups generated past the last step: the
    # async loop keeps engines and judges busy until training stops, and those groups are never trained)
    assert js["num_workers"] == 1
    assert len(js["calls_by_worker"]) == 4, js["calls_by_worker"]  # the first, two added, one replacement
    assert js["worker_deaths"] == 1 and js["start_failures"] == 0 and "died" in js["last_worker_failure"]
    (replacement,) = js["workers"]
    assert js["workers"][replacement]["completed"] > 0

    # no reward entry masked, no group lost or trained twice
    assert js["failures"] == {} and js["calls_timed_out"] == 0
    assert all(set(j["counts"]) == {"ok"} for j in js["judges"].values()), js["judges"]
    buf = report["buffer"]
    assert all(v == 0 for v in buf["masked"].values()), buf["masked"]
    assert buf["duplicate_writes"] == 0 and buf["nonfinite_values"] == 0
    # a group whose judging stalled while its worker's node went away may fall behind max_staleness: it is
    # dropped and counted, never trained; every group that became ready is accounted for
    assert buf["groups_became_ready"] == buf["groups_pulled"] + buf["dropped"]["stale"] + buf["groups"]["ready"]
    gps, g, k = cfg.rollout.groups_per_step, cfg.rollout.group_size, len(cfg.reward_names)
    trained = [gid for r in rows for gid in r["group_ids"]]
    assert all(len(r["group_ids"]) == gps for r in rows)
    assert len(trained) == STEPS * gps and len(set(trained)) == len(trained)
    assert buf["groups_pulled"] == STEPS * gps and buf["rows_pulled"] == STEPS * gps * g
    # a group is pulled once all its G x K entries are in; none was masked, so every trained entry is a score
    assert buf["entries_written"] >= buf["groups_pulled"] * g * k
    assert report["samples_trained"] == STEPS * gps * g
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))


# ---------------------------------------------------------------------------------------------- judge throughput

def backlog(n_groups: int, group_size: int, first_id: int) -> list[RolloutGroup]:
    prompt = Prompt("p", "say something safe", (1, 2), {})
    return [RolloutGroup(gid, prompt, tuple(Sample((1,), (0.0,), "stop", f"reply {gid}-{i}") for i in range(group_size)),
                         policy_version=0, engine="test", created_at=0.0)
            for gid in range(first_id, first_id + n_groups)]


def wait_live(pool: Any, n: int, budget_s: float = 180.0) -> None:
    end = time.monotonic() + budget_s
    while True:
        workers = pool.stats()["workers"]
        if sum(w["state"] == "live" for w in workers.values()) == n and len(workers) == n:
            return
        assert time.monotonic() < end, f"{n} live judge workers not within {budget_s:g}s: {workers}"
        assert pool.poll(timeout_s=0.2) == []


def score_backlog(pool: Any, groups: list[RolloutGroup], k: int) -> tuple[float, dict]:
    """Submit every group at once; returns (scored samples per second, entries by (group, sample))."""
    expected = sum(len(g.samples) for g in groups)
    got: dict[tuple[int, int], dict[int, Any]] = {}
    t0 = time.perf_counter()
    for g in groups:
        pool.submit(g)
    end = time.monotonic() + 180
    while sum(len(v) == k for v in got.values()) < expected:
        assert time.monotonic() < end, f"{len(got)} of {expected} samples scored: {pool.stats()}"
        for gid, s, j, res in pool.poll(timeout_s=0.5):
            assert j not in got.setdefault((gid, s), {}), f"entry ({gid}, {s}, {j}) returned twice"
            got[(gid, s)][j] = res
    return expected / (time.perf_counter() - t0), got


def test_judge_pool_grown_onto_an_added_judge_node_spreads_the_work_over_its_workers(one_judge_node):
    from actors.judges.pool import JudgePool

    mn = one_judge_node
    specs = [JudgeSpec(name="fmt", kind="regex", params={"pattern": r"[a-z]+ .*"}),
             JudgeSpec(name="rubric", kind="sleep", params={"seconds": 0.4})]  # type: ignore[arg-type]
    cfg = dataclasses.replace(Config(), judges=JudgesConfig(
        specs=specs, num_workers=1, min_workers=1, max_workers=3, concurrency=2, num_cpus=0.25,
        resources={"rvpo_judge": 1}))
    pool = JudgePool(cfg, extra_builders=EXTRA_BUILDERS)
    added = None
    try:
        wait_live(pool, 1)
        first = {wid: node_of(h) for wid, h in pool.worker_handles().items()}
        one, got1 = score_backlog(pool, backlog(6, 4, first_id=0), k=2)

        added = mn.add_judge_node()
        pool.resize(3)
        wait_live(pool, 3)
        nodes = {wid: node_of(h) for wid, h in pool.worker_handles().items()}
        calls_before = dict(pool.stats()["calls_by_worker"])
        three, got3 = score_backlog(pool, backlog(6, 4, first_id=6), k=2)
        stats = pool.stats()
        print(f"\njudge throughput: {one:.1f} samples/s with 1 worker, {three:.1f} with 3 ({three / one:.2f}x)")
    finally:
        pool.shutdown()
        if added is not None:
            mn.remove_judge_node(added)

    assert {mn.role_of(n) for n in [*first.values(), *nodes.values()]} == {"judge"}
    new_workers = {wid: n for wid, n in nodes.items() if wid not in first}
    assert len(new_workers) == 2 and added.node_id in new_workers.values(), (nodes, added.node_id)
    # how much faster three workers are is a benchmark's question (printed above), not an assertion here
    for got in (got1, got3):
        assert len(got) == 24
        assert all(e.status == "ok" for entries in got.values() for e in entries.values())
    assert stats["samples_done"] == 48 and stats["retries"] == 0 and stats["worker_deaths"] == 0
    second = {wid: stats["calls_by_worker"].get(wid, 0) - calls_before.get(wid, 0) for wid in nodes}
    assert sum(second.values()) == 24 and all(n > 0 for n in second.values()), (second, calls_before)
