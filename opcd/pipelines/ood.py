"""Out-of-distribution checks through lm-evaluation-harness (its Python API): does the distilled
student keep its other abilities? IFEval by default in the paper; any lm-eval task works.

The model is evaluated as the reference's IFEval command does: chat template applied, few-shot turns
as a conversation, sampled with T 0.7, top-p 0.8, top-k 20 (`evaluate.ood_gen_kwargs`), seed 42
(`evaluate.ood_seed`), thinking off (`evaluate.ood_enable_thinking`). Backends: `hf` (transformers,
runs on CPU) and `vllm` (GPU). Extra task definitions (YAML) can be read from a local folder, so
everything works offline when the task's data is local.
"""

from __future__ import annotations

import logging
import math

from opcd.errors import ConfigError

log = logging.getLogger("opcd.pipelines.ood")


def lm_eval_model_args(model_path: str, backend: str, dtype: str, enable_thinking: bool | None,
                       trust_remote_code: bool) -> dict:
    args = {"pretrained": model_path, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if enable_thinking is not None:
        args["enable_thinking"] = enable_thinking
        if enable_thinking:
            args["think_end_token"] = "</think>"  # lm-eval strips the thinking block before scoring
    if backend == "vllm":
        args["gpu_memory_utilization"] = 0.8
    return args


REFERENCE_SEED = 42


def simple_evaluate_kwargs(model_path: str, tasks: list[str], limit: int | None, backend: str, dtype: str,
                           enable_thinking: bool | None, trust_remote_code: bool, gen_kwargs: str | None,
                           seed: int, device: str) -> dict:
    """The arguments of `lm_eval.simple_evaluate`, as the reference's command line gives them
    (`--apply_chat_template --fewshot_as_multiturn --gen_kwargs ... --seed 42 --batch_size auto`)."""
    return {"model": backend,
            "model_args": lm_eval_model_args(model_path, backend, dtype, enable_thinking, trust_remote_code),
            "tasks": list(tasks), "limit": limit, "batch_size": "auto" if backend == "vllm" else 8, "device": device,
            "apply_chat_template": True, "fewshot_as_multiturn": True, "gen_kwargs": gen_kwargs or None,
            "random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed, "fewshot_random_seed": seed,
            "log_samples": False}


def run_lm_eval(model_path: str, tasks: list[str], limit: int | None = None, backend: str = "hf",
                include_path: str | None = None, dtype: str = "float32", enable_thinking: bool | None = None,
                trust_remote_code: bool = False, gen_kwargs: str | None = None,
                seed: int = REFERENCE_SEED) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for `model_path` (numbers only; lm-eval's stderr entries included).
    `gen_kwargs` (lm-eval's `key=value,...`) replaces each task's own generation settings; None keeps them."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"evaluate.ood_tasks: unknown lm-eval task(s) {unknown}"
                          + (f" (also searched {include_path})" if include_path else "")
                          + "; list them with `lm-eval ls tasks`")
    log.info("lm-eval %s on %s (%s backend, limit %s, gen_kwargs %s, seed %d)", ",".join(tasks), model_path,
             backend, limit, gen_kwargs, seed)
    output = lm_eval.simple_evaluate(
        **simple_evaluate_kwargs(model_path, tasks, limit, backend, dtype, enable_thinking, trust_remote_code,
                                 gen_kwargs, seed, "cuda" if torch.cuda.is_available() else "cpu"),
        task_manager=manager)
    results = {}
    for task, values in output["results"].items():
        results[task] = {name.replace(",none", ""): float(value) for name, value in values.items()
                         if isinstance(value, (int, float)) and not isinstance(value, bool)
                         and not (isinstance(value, float) and math.isnan(value))}
    return results
