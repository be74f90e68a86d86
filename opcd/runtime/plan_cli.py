"""The edge of `opcd distill --plan`: read the student's and teacher's config.json (a local folder, the
built-in model's converted folder, the Hugging Face cache, else the bundled table of known configs:
there is no hub access before a launch), read the card size, build and check the plan
(opcd/runtime/memory_plan.py). Loads no model and starts no Ray.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from opcd.errors import ConfigError
from opcd.runtime.memory_plan import GiB, Layout, check_fits, format_plan, plan
from opcd.runtime.model_shapes import KNOWN_CONFIGS, ModelShape

DEFAULT_CARD = 80 * GiB  # H100 / A100 80 GB (CUDA shows an H100 SXM as 79.6 GiB: pass --gpu-memory 79.6GiB)


def read_model_config(name: str) -> tuple[dict, str]:
    """(config dict, where it came from) for a model path or hub id."""
    folder = Path(name).expanduser()
    if name == "smollm2-135m-instruct":
        folder = Path(os.environ.get("OPCD_CACHE", Path.home() / ".cache" / "opcd")) / "models" / name
    if (folder / "config.json").is_file():
        return _read_json(folder / "config.json"), str(folder / "config.json")
    if name in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[name], f"{name} (bundled table of known configs: not read from the hub)"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a repo id (a missing local folder): fall through to the one-line error
        cached = None
    if isinstance(cached, str):
        return _read_json(Path(cached)), cached
    raise ConfigError(f"memory plan: no config.json for {name!r} (not a local folder, not in the Hugging Face "
                      f"cache, not one of the bundled configs: {', '.join(sorted(KNOWN_CONFIGS))})")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it as JSON: {exc}") from exc


def parse_size(text: str) -> int:
    """'80GiB', '80GB' (cards are sold in binary gigabytes: read as GiB), '81559MiB', '80' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|G|MiB|MB|M)?\s*", text or "", re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GiB, 141GiB or 81559MiB")
    unit = (match.group(2) or "g").lower()
    return int(float(match.group(1)) * (2**20 if unit.startswith("m") else GiB))


def card_bytes(text: str | None) -> tuple[int, str]:
    if text:
        return parse_size(text), "--gpu-memory"
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1], "this machine's GPU"
    return DEFAULT_CARD, "default (80 GB H100/A100; --gpu-memory to change)"


def print_plan(cfg, gpu_memory: str | None) -> str:
    """The plan's text; ConfigError (one line) when a phase exceeds the card."""
    text, memory, layout = _plan_text(cfg, gpu_memory)
    if layout.gpu:
        check_fits(memory)
    return text


def plan_comment(cfg, gpu_memory: str | None = None) -> str:
    """The plan as YAML comment lines, for `opcd distill --cfg` (which stays valid YAML and never
    refuses: a plan that cannot be made, or does not fit, is said in a comment)."""
    lines = []
    try:
        text, memory, layout = _plan_text(cfg, gpu_memory)
        lines = text.splitlines()
        if layout.gpu:
            check_fits(memory)
    except ConfigError as exc:
        message = str(exc)
        lines.append(message if message.startswith("memory plan") else f"memory plan: {message}")
    return "\n".join("# " + line for line in lines)


def _plan_text(cfg, gpu_memory: str | None):
    student_cfg, student_src = read_model_config(cfg.model.path)
    teacher_name = cfg.model.teacher_path or cfg.model.path
    teacher_cfg, teacher_src = read_model_config(teacher_name)
    student = ModelShape.from_config(student_cfg, student_src)
    teacher = ModelShape.from_config(teacher_cfg, teacher_src)
    layout = Layout.from_config(cfg)
    card, card_src = card_bytes(gpu_memory)
    memory = plan(student, teacher, layout, card)
    gpus = cfg.ray.nnodes * cfg.ray.gpus_per_node
    header = [f"memory plan of the resolved config ({gpus} GPUs: ray.nnodes={cfg.ray.nnodes} x "
              f"ray.gpus_per_node={cfg.ray.gpus_per_node}; estimates, not measured on GPU; docs/memory-plan.md)",
              f"student {cfg.model.path}: {student.params:,} parameters, {layout.student_ranks} ranks; "
              f"config: {student_src}",
              f"teacher {teacher_name}: {teacher.params:,} parameters, {layout.teacher_ranks} ranks "
              f"({cfg.ray.placement}); config: {teacher_src}",
              f"engine {layout.engine}: {layout.rows_per_engine} rows per engine x ({layout.prompt_tokens} prompt + "
              f"{layout.response_tokens} response tokens), TP {layout.tensor_parallel}, "
              f"gpu_memory_utilization {layout.gpu_memory_utilization}",
              f"update: largest micro-batch {layout.micro_tokens} tokens (teacher scoring: "
              f"{layout.teacher_micro_tokens}), activation checkpointing "
              f"{layout.activation_checkpointing}, dtype {cfg.model.dtype}; card: {card_src}"]
    if not layout.gpu:
        header.append("CPU run (ray.gpus_per_node=0): figures are per rank in host memory; no card check")
    return format_plan(memory, header), memory, layout
