"""`opcd extract`: experiential knowledge extraction (method.md §5), then automatic selection.

For each seed, over a stream of training problems (text games: of new episodes):

    score the held-out set with the current experience (version 0 = no experience)
    solve the next problem WITHOUT experience
    the writer (the same model, or extract.writer_path) turns the attempt into 1-2 new lessons
    append them, keep the newest within task.experience_max_length tokens, save experience_<i>.txt

The experience with the best held-out score over all seeds and steps (ties: the shorter) is copied
to `<run>/best_experience.txt`, with `scores.csv` (every seed and step) and `scores.png` (score per step, one line per seed) beside it. A seed whose
`scores.json` exists is skipped, so re-running an interrupted extraction continues.

    opcd extract task=math extract.stream_items=30 extract.seeds=[0,1,2]
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from opcd.runs.checkpoint import write_text_atomic
from opcd.runs.folder import claims_run_folder
from opcd.runs.identity import path_identity
from opcd.data.files import read_json, read_text
from opcd.errors import ConfigError, DataError
from opcd.config import DistillConfig
from opcd.data.contexts import split_items, truncate_experience
from opcd.domains import Domain
from opcd.data.experience import WRITER_PREFIX, Candidate, append_items, best_candidate, parse_writer_items
from opcd.runs.plots import plot_extraction
from opcd.models import check_same_tokenizer, load_tokenizer, resolve_model
from opcd.pipelines.domain_setup import make_domain
from opcd.pipelines.worker_setup import frozen_spec, generating_group, reserved_pools
from opcd.data.prompts import encode_chat, token_counter
from opcd.protocol import SamplingParams
from opcd.data.seeds import extraction_attempt_seed, extraction_heldout_seed, writer_seed
from opcd.workers.group import init_ray

log = logging.getLogger("opcd.extract")


class Extraction:
    """The models and the domain of one extraction run; `run_seed` is the loop above for one seed. The
    domain (opcd/domains/__init__.py) says what an item is, how the held-out set is scored and what the writer
    reads after an attempt: a dataset row, or a new game episode shown turn by turn."""

    def __init__(self, cfg: DistillConfig, tokenizer, solver, writer, domain: Domain):
        self.cfg, self.tokenizer, self.solver, self.writer, self.domain = cfg, tokenizer, solver, writer, domain
        self.count_tokens = token_counter(tokenizer)
        r = cfg.rollout
        self.solve_params = SamplingParams(r.eval_temperature, r.eval_top_p, r.eval_top_k, r.max_response_length)
        self.write_params = SamplingParams(r.eval_temperature, r.eval_top_p, r.eval_top_k,
                                           cfg.extract.writer_max_tokens)

    def _write(self, prompt: str, seed: int) -> str:
        """The writer's answer to `prompt`, started with the item marker (a response prefix), so even a
        small model that would ignore the format writes its first lesson in it."""
        ids = encode_chat(self.tokenizer, [{"role": "user", "content": prompt}], self.cfg.task.enable_thinking)
        ids += self.tokenizer(WRITER_PREFIX, add_special_tokens=False)["input_ids"]
        generation = self.writer.generate([ids], self.write_params, seed)
        response = generation.response_ids.masked_fill(~generation.response_mask, self.tokenizer.pad_token_id)
        (continuation,) = self.tokenizer.batch_decode(response, skip_special_tokens=True)
        return WRITER_PREFIX + continuation

    def lessons_from(self, item, experience: str, seed: int) -> dict:
        """Attempt `item` without experience, ask the writer for lessons; returns the whole exchange."""
        e = self.cfg.extract
        record, prompt = self.domain.extraction_attempt(self.solver, item, self.solve_params, seed,
                                                        experience if e.writer_sees_previous else None,
                                                        e.max_new_items)
        written = self._write(prompt, writer_seed(seed))
        return {**record, "writer_output": written, "items": parse_writer_items(written, e.max_new_items)}

    def run_seed(self, seed: int, seed_dir: Path) -> list[Candidate]:
        seed_dir.mkdir(parents=True, exist_ok=True)
        (seed_dir / "writer_log.jsonl").unlink(missing_ok=True)  # a seed is redone whole
        stream = self.domain.extraction_stream(seed, self.cfg.extract.stream_items)
        experience, records = "", []
        for step in range(len(stream) + 1):
            path = seed_dir / f"experience_{step}.txt"
            write_text_atomic(path, experience)
            heldout = self.domain.extraction_heldout(self.solver, experience, self.solve_params,
                                                     extraction_heldout_seed(seed, step))
            records.append({"seed": seed, "step": step, **heldout, "items": len(split_items(experience)),
                            "path": str(path), "length": len(experience)})
            log.info("seed %d step %d: held-out score %.3f with %d items", seed, step, heldout["score"],
                     records[-1]["items"])
            if step == len(stream):
                break
            exchange = self.lessons_from(stream[step], experience, extraction_attempt_seed(seed, step))
            with open(seed_dir / "writer_log.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step + 1, **exchange}, ensure_ascii=False) + "\n")
            experience = truncate_experience(append_items(experience, exchange["items"]), self.count_tokens,
                                             self.cfg.task.experience_max_length)
        write_text_atomic(seed_dir / "scores.json", json.dumps(records, indent=1))
        return [Candidate(r["seed"], r["step"], r["score"], r["path"], r["length"]) for r in records]


@claims_run_folder  # lock; trainer.resume=never moves an old extraction aside
def run_extract(cfg: DistillConfig) -> dict:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model.path)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    writer_path = resolve_model(cfg.extract.writer_path) if cfg.extract.writer_path else None
    if writer_path:
        check_same_tokenizer(tokenizer, load_tokenizer(writer_path, cfg.model.trust_remote_code), model_path,
                             writer_path)
    # rows (or a bad game id or option) are checked here, before Ray starts; the experience being
    # written is the only context
    domain = make_domain(cfg, tokenizer, None, "extract")
    settings = seed_settings(cfg, model_path, writer_path)
    for seed in cfg.extract.seeds:  # refused before Ray starts or a model loads
        if (run_dir / f"seed_{seed}" / "scores.json").is_file():
            check_seed_settings(run_dir / f"seed_{seed}", settings)

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    # the solver and the writer (a second model) share each GPU, as the student and teacher do
    ranks = cfg.ray.ranks_per_group  # every rank generates its share of each call
    with reserved_pools({"solver": ranks, **({"writer": ranks} if writer_path else {})}, cfg.ray) as pools:
        solver = generating_group("solver", frozen_spec(cfg, model_path, domain), cfg.ray, pools["solver"])
        writer = (generating_group("writer", frozen_spec(cfg, writer_path, domain), cfg.ray, pools["writer"])
                  if writer_path else solver)
        extraction = Extraction(cfg, tokenizer, solver, writer, domain)
        candidates: list[Candidate] = []
        try:
            for seed in cfg.extract.seeds:
                seed_dir = run_dir / f"seed_{seed}"
                done = seed_dir / "scores.json"
                if done.is_file():  # its settings were checked above
                    log.info("seed %d already extracted (%s) with the same model and settings: skipped", seed, done)
                    candidates += read_scores(done)
                    continue
                seed_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(seed_dir / SETTINGS, json.dumps(settings, indent=1, sort_keys=True))
                candidates += extraction.run_seed(seed, seed_dir)
        finally:
            for group in {id(solver): solver, id(writer): writer}.values():
                group.shutdown()
    return _select(run_dir, candidates)


SETTINGS = "settings.json"


def extract_defaults(cfg: DistillConfig, overrides: list[str]) -> DistillConfig:
    """`opcd extract` without trainer.exp_name writes to runs/extract-<task> (e.g. extract-math), not
    into the distillation demo's folder (the schema's default exp_name)."""
    if any(o.lstrip("+").startswith("trainer.exp_name=") for o in overrides):
        return cfg
    return replace(cfg, trainer=replace(cfg.trainer, exp_name=f"extract-{cfg.task.name}"))


def seed_settings(cfg: DistillConfig, model_path: str, writer_path: str | None) -> dict:
    """What makes a seed's extraction: the models' content (not only their paths), the task, the game,
    sampling, the extraction settings (less the list of seeds) and the run seed; as JSON reads it back."""
    e = {k: v for k, v in asdict(cfg.extract).items() if k != "seeds"}
    settings = {"model": path_identity(model_path), "writer": path_identity(writer_path) if writer_path else None,
                "task": asdict(cfg.task), "game": asdict(cfg.game), "rollout": asdict(cfg.rollout), "extract": e,
                "seed": cfg.trainer.seed}
    return json.loads(json.dumps(settings, default=str))


def check_seed_settings(seed_dir: Path, settings: dict) -> None:
    """A seed "already extracted" is reused only with the same model and settings; else one line."""
    path = seed_dir / SETTINGS
    saved = read_json(path, ConfigError, "the settings of an extracted seed") if path.is_file() else {}
    changed = [key for key in settings if saved.get(key) != settings[key]]
    if changed:
        detail = {key: sorted(k for k in set(saved.get(key) or {}) | set(settings[key] or {})
                              if (saved.get(key) or {}).get(k) != (settings[key] or {}).get(k))
                  if isinstance(settings[key], dict) else [] for key in changed}
        listing = ", ".join(key + (f" ({', '.join(map(str, detail[key][:3]))})" if detail[key] else "")
                            for key in changed)
        raise ConfigError(f"{seed_dir} was extracted with another model or settings ({listing}"
                          f"{'' if path.is_file() else f'; no {SETTINGS}'}): to extract again pass "
                          f"trainer.resume=never (the old extraction is moved aside), or pick another "
                          f"trainer.exp_name")


def read_scores(path: Path) -> list[Candidate]:
    """A seed's scores.json (a list of records) as candidates; a damaged one is one line."""
    import math

    text = read_text(path)
    try:
        records = json.loads(text)
        if not isinstance(records, list):
            raise TypeError(records)
        return [Candidate(int(r["seed"]), int(r["step"]), float(r["score"]), str(r["path"]), int(r["length"]))
                for r in records if math.isfinite(float(r["score"]))]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: expected a JSON list of records with seed, step, score, path, length") from None


def _select(run_dir: Path, candidates: list[Candidate]) -> dict:
    with open(run_dir / "scores.csv", "w", newline="") as fh:
        table = csv.writer(fh)
        table.writerow(["seed", "step", "heldout_score", "chars", "path"])
        for c in sorted(candidates, key=lambda c: (c.seed, c.step)):
            table.writerow([c.seed, c.step, f"{c.score:.4f}", c.length, c.path])
    baseline = [c.score for c in candidates if c.step == 0]
    try:
        best = best_candidate(candidates)
    except ValueError:
        summary = {"best": None, "no_experience_score": baseline, "reason": "the writer produced no lesson"}
        write_text_atomic(run_dir / "extract_summary.json", json.dumps(summary, indent=1))
        return summary
    shutil.copyfile(best.path, run_dir / "best_experience.txt")
    plot_extraction([{"seed": c.seed, "step": c.step, "score": c.score, "best": c == best} for c in candidates],
                    run_dir / "scores.png")
    summary = {"best": {"seed": best.seed, "step": best.step, "score": best.score, "path": best.path},
               "best_experience": str(run_dir / "best_experience.txt"), "no_experience_score": baseline}
    write_text_atomic(run_dir / "extract_summary.json", json.dumps(summary, indent=1))
    return summary
