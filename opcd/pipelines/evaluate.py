"""`opcd evaluate RUN_DIR`: every checkpoint of a run on the task's test split (text games: the fixed
held-out episodes, pass rate) WITHOUT the context,
plus the baselines (base model without and with the context), with the mean of the best k;
`evaluate.with_context` also scores every checkpoint with the context; `opcd evaluate --base`
scores a base model alone (`model.path`, composed like `opcd distill`; results in runs/<exp_name>).

The run's own `config.yaml` says which task, data, context and sampling to use; overrides after the
run folder change them (e.g. `evaluate.limit=1000 rollout.eval_temperature=0.6`). Results are cached
per checkpoint in `RUN_DIR/evaluation/<name>.json` (keyed by the settings that change a score), so a
second call only evaluates what is new. Written: `evaluation/results.csv` and `results.json`.

    opcd evaluate runs/french-demo
    opcd evaluate runs/med evaluate.steps=[2,4,6] evaluate.baselines=false
    opcd evaluate --base task=medmcqa model=hf model.path=Qwen/Qwen2.5-7B-Instruct evaluate.with_context=true
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from opcd.runs.checkpoint import complete_steps, step_dir, write_text_atomic
from opcd.config import DistillConfig, validate
from opcd.data.files import read_json
from opcd.errors import ConfigError, DataError
from opcd.runs.results import best_k_mean
from opcd.runs.export import model_folder
from opcd.models import load_tokenizer, resolve_model
from opcd.pipelines.domain_setup import load_run_context, make_domain, resolve_user_path
from opcd.pipelines.run_setup import eval_sampling
from opcd.pipelines.worker_setup import frozen_model_group, frozen_spec
from opcd.runs.folder import read_saved_config
from opcd.runs.identity import identity_digest
from opcd.data.seeds import eval_seed
from opcd.workers.group import init_ray

log = logging.getLogger("opcd.evaluate")


def load_run_config(run_dir: Path, overrides: list[str]) -> DistillConfig:
    """The run's saved config with dotted `overrides` (key=value) applied on top, validated again."""
    from omegaconf import OmegaConf

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} is not an opcd run folder (no config.yaml)")
    bad = [o for o in overrides if "=" not in o or o.split("=", 1)[0] in ("task", "model", "rollout", "trainer")]
    if bad:
        raise ConfigError(f"evaluate overrides must be dotted key=value pairs (e.g. evaluate.limit=100), got {bad}")
    config = OmegaConf.create(read_saved_config(saved))
    OmegaConf.update(config, "ray.gpus_per_node", None)  # a fact of the training machine: count this one's
    if overrides:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    return validate(config)


def checkpoints(run_dir: Path, steps: list[int] | None) -> list[int]:
    found = complete_steps(run_dir)
    if steps is None:
        return found
    missing = sorted(set(steps) - set(found))
    if missing:
        raise ConfigError(f"evaluate.steps: no complete checkpoint for steps {missing} in {run_dir} "
                          f"(found {found})")
    return sorted(steps)


def run_evaluate(run_dir: Path, cfg: DistillConfig, base_only: bool = False) -> dict:
    """Evaluate the run's checkpoints (and baselines); `base_only`: the base model `model.path` alone,
    without the context and, with evaluate.with_context, with it (no run folder needed)."""
    run_dir = Path(run_dir).absolute()  # checkpoint paths go to workers, which may run in other folders
    if base_only:
        _refuse_a_run_folder(run_dir)
    out = run_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    steps = [] if base_only else checkpoints(run_dir, cfg.evaluate.steps)
    base_path = resolve_model(cfg.model.path)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    domain = make_domain(cfg, tokenizer, load_run_context(cfg.task, tokenizer), "evaluate")
    params, seed = eval_sampling(cfg.rollout), eval_seed(cfg.trainer.seed)
    key = _settings_key(cfg, domain.num_eval_items, domain.settings)
    jobs = _jobs(run_dir, steps, base_path, cfg.evaluate.baselines, cfg.evaluate.with_context, base_only)
    results = {}
    for name, model_path, side in jobs:
        cached = out / f"{name}.json"
        job_key = f"{key}-{identity_digest(model_path)}"  # the same settings on another model is another score
        hit = _cached(cached, job_key)
        if hit is not None:
            results[name] = hit
            continue
        if not _ray_started():
            init_ray(cfg.ray.address, cfg.ray.num_cpus)
        with model_folder(model_path, out) as path, frozen_model_group(f"eval-{name}", frozen_spec(cfg, path, domain),
                                                                                cfg.ray) as group:
            result = domain.evaluate(name, group, side, params, seed)
        results[name] = {**result.summary(), "settings": job_key}
        write_text_atomic(cached, json.dumps({**results[name], "samples": result.samples}, ensure_ascii=False,
                                             indent=1))
        log.info("%s: score %.4f over %d items", name, result.score, result.num_items)
    summary = _write_tables(out, steps, results, cfg.evaluate.best_k)
    if cfg.evaluate.ood_tasks:
        ood_jobs = [(name, path) for name, path, side in jobs if side == "student"]
        summary["ood"] = _out_of_distribution(cfg, out, ood_jobs)
        write_text_atomic(out / "results.json", json.dumps(summary, indent=1))
    return summary


def _refuse_a_run_folder(run_dir: Path) -> None:
    """`--base` writes evaluation/results.json under runs/<exp_name>: never over a run's own results."""
    results = run_dir / "evaluation" / "results.json"
    scored = results.is_file() and bool(read_json(results).get("checkpoints"))
    if complete_steps(run_dir) or scored:
        raise ConfigError(f"opcd evaluate --base: {run_dir} holds a run's checkpoints or their results, which "
                          f"--base would overwrite: pick another trainer.exp_name (for this run's baselines use "
                          f"`opcd evaluate {run_dir} evaluate.baselines=true`)")


def _cached(path: Path, key) -> dict | None:
    """A cached result written for the same settings, else None. A damaged cache file (a crash, an edit)
    is only a cache: one warning line, and the model is evaluated again and the file rewritten."""
    if not path.is_file():
        return None
    try:
        cached = read_json(path, expected="a cached evaluation (a JSON object with 'settings')")
    except DataError as exc:
        log.warning("%s; evaluating again", exc)
        return None
    return cached if cached.get("settings") == key else None


def _jobs(run_dir: Path, steps: list[int], base_path: str, baselines: bool, with_context: bool,
          base_only: bool) -> list[tuple[str, str, str]]:
    """(name, model folder, side) to evaluate; side "student" = without the context, "teacher" = with it."""
    # a checkpoint folder: its Hugging Face folder, or a temporary export of its shards (opcd/runs/export.py)
    models = [(f"step_{s}", str(step_dir(run_dir, s))) for s in steps]
    jobs = [(name, path, "student") for name, path in models]
    if with_context:
        jobs += [(f"{name}_with_context", path, "teacher") for name, path in models]
    if baselines or base_only:
        jobs.append(("base_without_context", base_path, "student"))
    if baselines or (base_only and with_context):
        jobs.append(("base_with_context", base_path, "teacher"))
    return jobs


def _out_of_distribution(cfg: DistillConfig, out: Path, jobs: list[tuple[str, str]]) -> dict:
    """lm-eval tasks (e.g. IFEval) on every checkpoint and the base model, cached like the task scores;
    also written as evaluation/ood.csv (name, task, metric, value)."""
    from opcd.pipelines.ood import run_lm_eval

    e = cfg.evaluate
    key = hashlib.sha256(json.dumps({"tasks": e.ood_tasks, "limit": e.ood_limit, "include": e.ood_include_path,
                                     "backend": e.ood_backend, "thinking": e.ood_enable_thinking,
                                     "gen_kwargs": e.ood_gen_kwargs, "seed": e.ood_seed},
                                    sort_keys=True).encode()).hexdigest()[:16]
    results = {}
    for name, model_path in jobs:
        cached = out / f"ood_{name}.json"
        hit = _cached(cached, key)
        if hit is not None and isinstance(hit.get("results"), dict):
            results[name] = hit["results"]
            continue
        with model_folder(model_path, out) as path:
            results[name] = run_lm_eval(path, e.ood_tasks, e.ood_limit if e.ood_limit > 0 else None, e.ood_backend,
                                        resolve_user_path(e.ood_include_path) if e.ood_include_path else None,
                                        cfg.model.dtype, e.ood_enable_thinking, cfg.model.trust_remote_code,
                                        e.ood_gen_kwargs, e.ood_seed)
        write_text_atomic(cached, json.dumps({"settings": key, "results": results[name]}, indent=1))
    with open(out / "ood.csv", "w", newline="") as fh:
        table = csv.writer(fh)
        table.writerow(["name", "task", "metric", "value"])
        for name, tasks in results.items():
            for task, metrics in tasks.items():
                for metric, value in metrics.items():
                    table.writerow([name, task, metric, f"{value:.4f}"])
    return results


def _settings_key(cfg: DistillConfig, num_items: int, domain_settings: dict) -> str:
    """What changes a score: data (and the game), context, sampling, length, seed. Cached results must
    match it."""
    relevant = {"task": asdict(cfg.task), "rollout": asdict(cfg.rollout), "seed": cfg.trainer.seed,
                "items": num_items, **domain_settings}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _write_tables(out: Path, steps: list[int], results: dict, best_k: int) -> dict:
    per_step = {s: results[f"step_{s}"]["score"] for s in steps}
    summary = {"checkpoints": per_step,
               "best": best_k_mean(per_step, best_k) if per_step else None,
               "checkpoints_with_context": {s: results[f"step_{s}_with_context"]["score"] for s in steps
                                            if f"step_{s}_with_context" in results},
               "baselines": {name: results[name]["score"] for name in ("base_without_context", "base_with_context")
                             if name in results}}
    with open(out / "results.csv", "w", newline="") as fh:
        table = csv.writer(fh)
        table.writerow(["name", "step", "score", "num_items"])
        for name, result in results.items():
            step = name.split("_")[1] if name.startswith("step_") else ""
            table.writerow([name, step, f"{result['score']:.4f}", result["num_items"]])
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1))
    return summary


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()
