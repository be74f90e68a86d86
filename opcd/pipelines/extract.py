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
from pathlib import Path

from opcd.checkpoint import write_text_atomic
from opcd.config import DistillConfig
from opcd.contexts import ITEM_MARKER, split_items, truncate_experience, with_experience
from opcd.data import load_rows, shuffled_order
from opcd.experience import (WRITER_PREFIX, Candidate, append_items, best_candidate, parse_writer_items,
                             writer_prompt)
from opcd.evaluation import evaluate_games
from opcd.games.prompts import writer_prompt as game_writer_prompt
from opcd.games.seeds import heldout_seeds, training_seeds
from opcd.plots import plot_extraction
from opcd.models import check_same_tokenizer, load_tokenizer, resolve_model
from opcd.pipelines.distill import build_player, reserved_pools, resolve_user_path, worker_spec
from opcd.prompts import encode_chat, token_counter
from opcd.protocol import SamplingParams
from opcd.tasks import get_task
from opcd.workers.group import WorkerGroup, init_ray
from opcd.workers.frozen import FrozenModelWorker

log = logging.getLogger("opcd.extract")


class Extraction:
    """The models and data of one extraction run; `run_seed` is the loop above for one seed."""

    def __init__(self, cfg: DistillConfig, tokenizer, solver, writer, train_rows, heldout_rows):
        self.cfg, self.tokenizer, self.solver, self.writer = cfg, tokenizer, solver, writer
        self.task = None if cfg.task.name == "textgame" else get_task(cfg.task.name)  # games score episodes
        self.train_rows, self.heldout_rows = train_rows, heldout_rows
        self.count_tokens = token_counter(tokenizer)
        r = cfg.rollout
        self.solve_params = SamplingParams(r.eval_temperature, r.eval_top_p, r.eval_top_k, r.max_response_length)
        self.write_params = SamplingParams(r.eval_temperature, r.eval_top_p, r.eval_top_k,
                                           cfg.extract.writer_max_tokens)

    def _prompt(self, row: dict, experience: str) -> list[int]:
        messages = self.task.student_messages(row)
        return encode_chat(self.tokenizer, with_experience(messages, experience) if experience else messages,
                           self.cfg.task.enable_thinking)

    def _generate(self, group, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[str]:
        generation = group.gather("generate", prompts, params, seed)
        ids = generation.response_ids.masked_fill(~generation.response_mask, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def stream(self, seed: int) -> list:
        """The training items consumed by one seed's extraction, in order."""
        order = shuffled_order(len(self.train_rows), seed, 0)[:self.cfg.extract.stream_items]
        return [self.train_rows[i] for i in order]

    def heldout(self, experience: str, seed: int) -> dict:
        """{"score": held-out task metric with `experience`, and any other figures to record}."""
        prompts = [self._prompt(row, experience) for row in self.heldout_rows]
        texts = self._generate(self.solver, prompts, self.solve_params, seed)
        return {"score": sum(self.task.score(t, r) for t, r in zip(texts, self.heldout_rows)) / len(self.heldout_rows)}

    def _write(self, prompt: str, seed: int) -> str:
        """The writer's answer to `prompt`, started with the item marker (a response prefix), so even a
        small model that would ignore the format writes its first lesson in it."""
        ids = encode_chat(self.tokenizer, [{"role": "user", "content": prompt}], self.cfg.task.enable_thinking)
        ids += self.tokenizer(WRITER_PREFIX, add_special_tokens=False)["input_ids"]
        (continuation,) = self._generate(self.writer, [ids], self.write_params, seed)
        return WRITER_PREFIX + continuation

    def lessons_from(self, row: dict, experience: str, seed: int) -> dict:
        """Solve `row` without experience, ask the writer for lessons; returns the whole exchange."""
        (attempt,) = self._generate(self.solver, [self._prompt(row, "")], self.solve_params, seed)
        correct = self.task.score(attempt, row)
        previous = experience if self.cfg.extract.writer_sees_previous else None
        prompt = writer_prompt(row["content"][-1]["content"], attempt, correct >= 1.0, str(row["answer"]),
                               previous, self.cfg.extract.max_new_items)
        written = self._write(prompt, seed + 1)
        return {"problem_id": row.get("id"), "attempt": attempt, "score": correct, "writer_output": written,
                "items": parse_writer_items(written, self.cfg.extract.max_new_items)}

    def run_seed(self, seed: int, seed_dir: Path) -> list[Candidate]:
        seed_dir.mkdir(parents=True, exist_ok=True)
        (seed_dir / "writer_log.jsonl").unlink(missing_ok=True)  # a seed is redone whole
        stream = self.stream(seed)
        experience, records = "", []
        for step in range(len(stream) + 1):
            path = seed_dir / f"experience_{step}.txt"
            write_text_atomic(path, experience)
            heldout = self.heldout(experience, seed * 1_000_003 + 2 * step)
            records.append({"seed": seed, "step": step, **heldout, "items": len(split_items(experience)),
                            "path": str(path), "length": len(experience)})
            log.info("seed %d step %d: held-out score %.3f with %d items", seed, step, heldout["score"],
                     records[-1]["items"])
            if step == len(stream):
                break
            exchange = self.lessons_from(stream[step], experience, seed * 1_000_003 + 2 * step + 1)
            with open(seed_dir / "writer_log.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step + 1, **exchange}, ensure_ascii=False) + "\n")
            experience = truncate_experience(append_items(experience, exchange["items"]), self.count_tokens,
                                             self.cfg.task.experience_max_length)
        write_text_atomic(seed_dir / "scores.json", json.dumps(records, indent=1))
        return [Candidate(r["seed"], r["step"], r["score"], r["path"], r["length"]) for r in records]


class GameExtraction(Extraction):
    """The same loop for text games: held-out = the fixed evaluation episodes (pass rate, moves and
    answer tokens per turn recorded); a stream item = one new episode played without experience,
    shown to the writer turn by turn with its outcome."""

    def __init__(self, cfg: DistillConfig, tokenizer, solver, writer):
        super().__init__(cfg, tokenizer, solver, writer, [], [])
        self.player = build_player(cfg, tokenizer)
        self.heldout_seeds = heldout_seeds(cfg.game.eval_episodes)

    def stream(self, seed: int) -> list:
        return [training_seeds(seed, item + 1, 1)[0] for item in range(self.cfg.extract.stream_items)]

    def heldout(self, experience: str, seed: int) -> dict:
        result = evaluate_games("heldout", self.solver, self.player, self.heldout_seeds, self.solve_params, seed,
                                experience or None)
        return {"score": result.score, "turns_per_episode": result.extra["turns_per_episode"],
                "tokens_per_turn": result.mean_response_tokens,
                "invalid_moves_per_episode": result.extra["invalid_moves_per_episode"]}

    def lessons_from(self, game_seed: int, experience: str, seed: int) -> dict:
        generate = lambda prompts, params, s: self.solver.gather("generate", prompts, params, s)  # noqa: E731
        (episode,) = self.player.play(generate, [game_seed], self.solve_params, seed)
        previous = experience if self.cfg.extract.writer_sees_previous else None
        prompt = game_writer_prompt(self.player.rules, [t.past() for t in episode.turns], episode.observation,
                                    episode.success, previous, self.cfg.extract.max_new_items, ITEM_MARKER)
        written = self._write(prompt, seed + 1)
        return {"episode_seed": game_seed, **episode.summary(), "score": float(episode.success),
                "writer_output": written, "items": parse_writer_items(written, self.cfg.extract.max_new_items)}


def run_extract(cfg: DistillConfig) -> dict:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model.path)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    writer_path = resolve_model(cfg.extract.writer_path) if cfg.extract.writer_path else None
    if writer_path:
        check_same_tokenizer(tokenizer, load_tokenizer(writer_path, cfg.model.trust_remote_code), model_path,
                             writer_path)
    games = cfg.task.name == "textgame"
    if games:
        build_player(cfg, tokenizer)  # a bad game id or option fails here, before Ray starts
    else:
        train_rows = load_rows(resolve_user_path(cfg.task.train_data), cfg.task.train_split)
        heldout = cfg.extract.heldout_size if cfg.extract.heldout_size > 0 else None
        heldout_rows = load_rows(resolve_user_path(cfg.task.test_data), cfg.task.test_split, heldout)

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    # the solver and the writer (a second model) share each GPU, as the student and teacher do
    with reserved_pools({"solver": 1, **({"writer": 1} if writer_path else {})}, cfg.ray) as pools:
        solver = WorkerGroup("solver", FrozenModelWorker, {"spec": worker_spec(cfg, model_path)},
                             pool=pools["solver"])
        writer = WorkerGroup("writer", FrozenModelWorker, {"spec": worker_spec(cfg, writer_path)},
                             pool=pools["writer"]) if writer_path else solver
        extraction = GameExtraction(cfg, tokenizer, solver, writer) if games else \
            Extraction(cfg, tokenizer, solver, writer, train_rows, heldout_rows)
        candidates: list[Candidate] = []
        try:
            for seed in cfg.extract.seeds:
                seed_dir = run_dir / f"seed_{seed}"
                done = seed_dir / "scores.json"
                if done.is_file():
                    log.info("seed %d already extracted (%s): skipped", seed, done)
                    candidates += [Candidate(r["seed"], r["step"], r["score"], r["path"], r["length"])
                                   for r in json.loads(done.read_text())]
                    continue
                candidates += extraction.run_seed(seed, seed_dir)
        finally:
            for group in {id(solver): solver, id(writer): writer}.values():
                group.shutdown()
    return _select(run_dir, candidates)


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
