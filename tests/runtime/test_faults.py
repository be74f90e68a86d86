"""The test-only fault injection ($OPCD_TEST_FAULT, opcd/runtime/faults.py), without Ray."""

import pytest

from opcd.errors import ConfigError
from opcd.runtime.faults import planned, with_fault


class Worker:
    def __init__(self, rank: int):
        self.rank = rank

    def update(self, x):
        return x + 1


def test_no_variable_leaves_the_class_alone():
    assert with_fault(Worker, "student", {}) is Worker
    assert with_fault(Worker, "teacher", {"OPCD_TEST_FAULT": "student:update:1:2:raise"}) is Worker


def test_the_planned_call_of_the_planned_rank_raises_and_nothing_else():
    faulty = with_fault(Worker, "student", {"OPCD_TEST_FAULT": "student:update:1:2:raise"})
    assert faulty.__name__ == "Worker"  # the actor's process title is the worker's
    rank0, rank1 = faulty(0), faulty(1)
    assert [rank0.update(1), rank0.update(2), rank0.update(3)] == [2, 3, 4]
    assert rank1.update(1) == 2
    with pytest.raises(RuntimeError, match=r"^injected fault \(OPCD_TEST_FAULT\): student rank 1 raises in call 2"):
        rank1.update(2)
    assert rank1.update(3) == 4


@pytest.mark.parametrize("value", ["student:update:1:2", "student:update:x:2:raise", "student:update:1:0:raise",
                                   "student:update:1:2:explode"])
def test_a_malformed_plan_is_one_line(value):
    with pytest.raises(ConfigError, match=r"^OPCD_TEST_FAULT='.*': expected GROUP:METHOD:RANK:CALL:ACTION"):
        planned({"OPCD_TEST_FAULT": value})


def test_an_unknown_method_is_one_line():
    with pytest.raises(ConfigError, match=r"^OPCD_TEST_FAULT: Worker has no method 'updat'"):
        with_fault(Worker, "student", {"OPCD_TEST_FAULT": "student:updat:1:2:raise"})
