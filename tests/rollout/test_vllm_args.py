"""The arguments a tensor-parallel vLLM engine gets (pure: no engine is built)."""

import pytest

from opcd.errors import ConfigError
from opcd.rollout.vllm import tensor_parallel_engine


def test_tensor_parallel_engines_use_the_external_launcher_only():
    args, env = tensor_parallel_engine(4, rank=6, world=16, local_rank=0)
    assert args == {"tensor_parallel_size": 4, "distributed_executor_backend": "external_launcher",
                    "disable_custom_all_reduce": True}
    assert "data_parallel_size" not in args  # independent engines: no vLLM data-parallel coordination
    # LOCAL_RANK is the actor's own CUDA device (Ray shows it as cuda:0), not rank % GPUs per node
    assert env == {"RANK": "6", "WORLD_SIZE": "16", "LOCAL_RANK": "0"}


def test_a_tensor_parallel_size_that_does_not_divide_the_ranks_is_refused():
    with pytest.raises(ConfigError, match=r"^config rollout\.vllm_tensor_parallel_size=3: expected a divisor "
                                          r"of the student's 8 ranks"):
        tensor_parallel_engine(3, rank=0, world=8, local_rank=0)
