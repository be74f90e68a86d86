"""Placement pools: which bundles each layout asks for (pure), and where Ray really puts the ranks."""

import re

import pytest
import ray

from opcd.errors import ConfigError
from opcd.workers.group import WorkerGroup
from opcd.workers.placement import (Pool, bundles_needed, check_engines_on_one_node, gpus_per_actor, make_pools,
                                    rank_order, remove_pools)


def test_colocate_is_one_pool_with_a_bundle_per_rank_shared_by_every_group():
    assert bundles_needed({"student": 2, "teacher": 2}, gpus=True, placement="colocate") == {
        "shared": [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]}
    assert bundles_needed({"student": 1, "teacher": 3}, gpus=False, placement="colocate") == {
        "shared": [{"CPU": 2.0}] * 3}


def test_separate_is_one_pool_per_group_with_whole_gpus():
    assert bundles_needed({"student": 2, "teacher": 1}, gpus=True, placement="separate") == {
        "student": [{"CPU": 1.0, "GPU": 1.0}] * 2, "teacher": [{"CPU": 1.0, "GPU": 1.0}]}


def test_unknown_placement_is_refused():
    with pytest.raises(ConfigError, match="ray.placement='spread'"):
        bundles_needed({"student": 1}, gpus=False, placement="spread")


def _where_class():
    """An actor class that reports its placement group (defined in a function so Ray ships it by
    value: the workers cannot import this test module)."""

    class Where:
        def __init__(self, rank: int = 0, world_size: int = 1):
            self.rank = rank

        def where(self) -> str:
            return ray.get_runtime_context().get_placement_group_id()

    return Where


def test_colocated_groups_share_one_pool_rank_by_rank(local_ray):
    pools = make_pools({"student": 2, "teacher": 2}, gpus=False, placement="colocate")
    try:
        assert pools["student"].group.id == pools["teacher"].group.id
        options = [pools["teacher"].actor_options(rank) for rank in (0, 1)]
        assert [o["scheduling_strategy"].placement_group_bundle_index for o in options] == [0, 1]
        assert options[0]["num_gpus"] == 0.0 and options[0]["num_cpus"] == 1.0
        student = WorkerGroup("student", _where_class(), {}, pool=pools["student"])
        teacher = WorkerGroup("teacher", _where_class(), {}, pool=pools["teacher"])
        (s,), (t,) = student.call(student.worker_cls.where), teacher.call(teacher.worker_cls.where)
        assert s == t == pools["student"].group.id.hex()
        student.shutdown()
        teacher.shutdown()
    finally:
        remove_pools(pools.values())


def test_colocated_groups_share_each_gpu_equally():
    assert gpus_per_actor({"student": 1, "teacher": 1}, gpus=True, placement="colocate") == 0.5
    assert gpus_per_actor({"solver": 1}, gpus=True, placement="colocate") == 1.0
    assert gpus_per_actor({"student": 2, "teacher": 1}, gpus=True, placement="separate") == 1.0
    assert gpus_per_actor({"student": 2, "teacher": 2}, gpus=False, placement="colocate") == 0.0


def test_separate_pools_are_distinct(local_ray):
    pools = make_pools({"student": 1, "teacher": 1}, gpus=False, placement="separate")
    try:
        student = WorkerGroup("student", _where_class(), {}, pool=pools["student"])
        teacher = WorkerGroup("teacher", _where_class(), {}, pool=pools["teacher"])
        (s,), (t,) = student.call(student.worker_cls.where), teacher.call(teacher.worker_cls.where)
        assert s != t and {s, t} == {pools["student"].group.id.hex(), pools["teacher"].group.id.hex()}
        student.shutdown()
        teacher.shutdown()
    finally:
        remove_pools(pools.values())


def test_pools_larger_than_the_cluster_are_refused_in_one_line(local_ray):
    with pytest.raises(ConfigError) as err:
        make_pools({"student": 4, "teacher": 4}, gpus=True, placement="colocate")
    message = str(err.value)
    assert "\n" not in message and "need 4 GPU" in message and "the cluster has 0 GPU" in message


class RecordingGroup(WorkerGroup):
    """The real worker group, noting each group's pool, ranks and the Ray node of every rank."""

    built: list[dict] = []

    def __init__(self, name, worker_cls, kwargs, world_size=1, pool=None, **options):
        super().__init__(name, worker_cls, kwargs, world_size=world_size, pool=pool, **options)
        nodes = ray.get([w.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                         for w in self.workers])
        RecordingGroup.built.append({"name": name, "ranks": world_size, "pool": pool.group.id.hex(), "nodes": nodes})


def one_step_overrides(tiny_model, runs_dir, steps: int = 1, batch_size: int = 2) -> list[str]:
    return [f"model.path={tiny_model}", f"trainer.runs_dir={runs_dir}", "trainer.exp_name=run",
            f"trainer.total_training_steps={steps}", f"trainer.batch_size={batch_size}", "trainer.micro_batch_size=1",
            "trainer.eval_before=false", "trainer.eval_after=false", "trainer.loggers=[jsonl]", "trainer.num_threads=1",
            "rollout.max_response_length=4", "loss.kl_topk=8"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", [[], ["ray.placement=separate", "ray.teacher_ranks=2"]], ids=["colocate", "separate"])
def test_both_layouts_build_their_groups_and_train_a_step(tmp_path, tiny_model, local_ray, monkeypatch, layout):
    """Regression: the teacher group was built on the student's pool with the student's rank count,
    so `ray.teacher_ranks` was ignored and with `ray.placement=separate` the teacher actors asked for
    bundles the student already held and could never be scheduled."""
    from opcd.config import load_config
    from opcd.pipelines import distill

    monkeypatch.setattr(distill, "WorkerGroup", RecordingGroup)
    RecordingGroup.built = []
    assert distill.run_distill(load_config(one_step_overrides(tiny_model, tmp_path) + layout))["final_step"] == 1
    student, teacher = RecordingGroup.built
    assert (student["name"], teacher["name"]) == ("student", "teacher")
    if layout:
        assert (student["ranks"], teacher["ranks"]) == (1, 2) and student["pool"] != teacher["pool"]
    else:
        assert (student["ranks"], teacher["ranks"]) == (1, 1) and student["pool"] == teacher["pool"]


def test_ranks_take_the_bundles_node_by_node():
    # Ray put bundles 0, 2, 4, 6 on node a and 1, 3, 5, 7 on node b (PACK promises no order)
    nodes = ["a", "b"] * 4
    order = rank_order(nodes)
    assert order == (0, 2, 4, 6, 1, 3, 5, 7)
    assert [nodes[b] for b in order] == ["a"] * 4 + ["b"] * 4
    check_engines_on_one_node(nodes, order, ranks_per_engine=4)  # two engines of 4, one per node
    assert rank_order(["b", "b", "a", "a"]) == (0, 1, 2, 3)  # nodes in the order of their first bundle


def test_an_engine_across_nodes_is_refused_in_one_line():
    nodes = ["a", "a", "a", "b", "b", "b"]  # 3 GPUs a node cannot hold engines of 2
    with pytest.raises(ConfigError, match=r"^config rollout\.vllm_tensor_parallel_size=2: the ranks 2-3 of one "
                                          r"engine were placed on 2 nodes"):
        check_engines_on_one_node(nodes, rank_order(nodes), ranks_per_engine=2)
    Pool(group=None, gpus_per_actor=1.0, order=(0, 1, 2, 3, 4, 5), nodes=tuple(nodes)).check_engines(3)
    with pytest.raises(ConfigError):
        Pool(group=None, gpus_per_actor=1.0, order=(0, 1, 2, 3, 4, 5), nodes=tuple(nodes)).check_engines(2)


def test_pools_on_a_local_node_record_where_their_bundles_are(local_ray):
    pools = make_pools({"student": 2, "teacher": 2}, gpus=False, placement="colocate")
    try:
        pool = pools["student"]
        assert pool.order == (0, 1) and len(set(pool.nodes)) == 1
    finally:
        remove_pools(pools.values())
