"""Worker methods are called through the worker class: an unknown or foreign method is refused on
the driver, in one line, before anything reaches a rank."""

import pytest

from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.group import WorkerGroup
from opcd.workers.student import StudentWorker


def _group(worker_cls) -> WorkerGroup:
    group = WorkerGroup.__new__(WorkerGroup)  # no Ray actors: only the driver-side check runs
    group.name, group.worker_cls = "student", worker_cls
    return group


def test_methods_of_the_class_and_its_base_are_accepted():
    group = _group(StudentWorker)
    assert group._method_name(StudentWorker.update) == "update"
    assert group._method_name(StudentWorker.gpu_memory) == "gpu_memory"  # defined on ModelWorker
    assert group._method_name("__ray_ready__") == "__ray_ready__"


@pytest.mark.parametrize("method", ["update", FrozenModelWorker.score, print])
def test_names_and_other_classes_methods_are_refused(method):
    with pytest.raises(TypeError, match=r"^student group: .* is not a method of StudentWorker; call through the "
                                        r"class, e\.g\. group\.call\(StudentWorker\.<method>, \.\.\.\)$"):
        _group(StudentWorker).call(method)
