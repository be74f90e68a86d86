"""`opcd oel`: Online Experiential Learning rounds (method.md §7), for text games.

Each round r, starting from the previous round's trained policy (round 1: model.path):

    extract      the policy writes experience from its own episodes (`opcd extract`, every seed of
                 extract.seeds); the best oel.experiences_per_round files become the round's list
    deploy       the policy plays oel.deploy_episodes new episodes WITHOUT experience; every visited
                 state (board, history, moves left) is stored in deploy/states.jsonl
    consolidate  on-policy distillation on the stored states: the current student answers each state
                 without experience, the teacher (the round's starting policy) scores the answer with
                 one experience file sampled per state from the list

Everything a round writes is kept under `<run>/round_<r>/` (extract/, experiences.list, deploy/,
consolidate/ with its checkpoints), with `<phase>.done` markers: re-running the command continues at
the first unfinished phase (a half-finished consolidation resumes from its last checkpoint).
`<run>/oel_summary.json` lists each round's held-out pass rates.

    opcd oel game.name=Sokoban-v0 oel.rounds=3 extract.stream_items=10
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import replace
from pathlib import Path

from opcd.runs.checkpoint import latest_checkpoint, write_text_atomic
from opcd.config import DistillConfig
from opcd.data.files import read_json, read_text
from opcd.errors import ConfigError, DataError
from opcd.games.play import episode_metrics
from opcd.games.states import state_rows
from opcd.pipelines.distill import run_distill
from opcd.pipelines.extract import run_extract
from opcd.pipelines.domain_setup import build_player, require_games
from opcd.pipelines.run_setup import prepare, rollout_sampling
from opcd.pipelines.worker_setup import frozen_model_group, frozen_spec
from opcd.data.seeds import deploy_run_seed, step_seed, training_seeds
from opcd.workers.group import init_ray

log = logging.getLogger("opcd.oel")


class OnlineExperientialLearning:
    def __init__(self, cfg: DistillConfig):
        require_games(cfg.task, "opcd oel")
        self.cfg = cfg
        self.run_dir = cfg.run_dir

    # -- the rounds -----------------------------------------------------------------------------------
    def run(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        o = self.cfg.oel
        policy = self.cfg.model.path  # the policy round `first_round` starts from
        rounds = []
        for r in range(o.first_round, o.rounds + 1):
            folder = self.run_dir / f"round_{r}"
            folder.mkdir(exist_ok=True)
            done = {"round": r, "policy": policy}
            for name, work in (("extract", self._extract), ("deploy", self._deploy),
                               ("consolidate", self._consolidate)):
                if name in o.phases:
                    done.update(self._phase(folder, name, lambda w=work: w(folder, policy, r)))
            rounds.append(done)
            policy = done.get("policy_after", policy)
            write_text_atomic(self.run_dir / "oel_summary.json", json.dumps({"rounds": rounds}, indent=1))
        return {"run_dir": str(self.run_dir), "rounds": rounds, "final_policy": policy}

    def _phase(self, folder: Path, name: str, work) -> dict:
        marker = folder / f"{name}.done"
        if marker.is_file():
            try:
                done = read_json(marker, expected=f"the result of the {name} phase")
                log.info("%s: %s already done", folder.name, name)
                return done
            except DataError as exc:  # written atomically, so only damage by hand: the phase runs again
                log.warning("%s; running %s again", exc, name)
        log.info("%s: %s", folder.name, name)
        result = work()
        write_text_atomic(marker, json.dumps(result, indent=1))
        return result

    def _round_cfg(self, folder: Path, exp_name: str, policy: str, **changes) -> DistillConfig:
        trainer = replace(self.cfg.trainer, runs_dir=str(folder), exp_name=exp_name)
        model = replace(self.cfg.model, path=policy, teacher_path=None)
        return replace(self.cfg, trainer=trainer, model=model, **changes)

    # -- phases ---------------------------------------------------------------------------------------
    def _extract(self, folder: Path, policy: str, r: int) -> dict:
        cfg = self._round_cfg(folder, "extract", policy)
        summary = run_extract(cfg)
        if summary.get("best") is None:
            raise DataError(f"{folder}/extract: the writer produced no lesson; OEL needs at least one "
                            f"experience (raise extract.writer_max_tokens or use a stronger writer)")
        chosen = _best_experiences(folder / "extract" / "scores.csv", self.cfg.oel.experiences_per_round)
        listing = folder / "experiences.list"
        write_text_atomic(listing, "".join(f"{Path(p).resolve()}\n" for p in chosen))
        return {"experiences": str(listing), "extract_best_score": summary["best"]["score"],
                "no_experience_score": summary["no_experience_score"]}

    def _deploy(self, folder: Path, policy: str, r: int) -> dict:
        cfg = self._round_cfg(folder, "deploy", policy)
        prepared = prepare(cfg)
        player = build_player(cfg.game, cfg.task, prepared.tokenizer)
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
        with frozen_model_group("deploy", frozen_spec(cfg, prepared.student_path, prepared.domain), cfg.ray) as group:
            seeds = training_seeds(deploy_run_seed(r), 1, self.cfg.oel.deploy_episodes)
            episodes = player.play(group.generate, seeds,
                                   rollout_sampling(cfg.rollout, cfg.loss), step_seed(cfg.trainer.seed, r))
        rows = state_rows(episodes)
        out = folder / "deploy"
        out.mkdir(exist_ok=True)
        write_text_atomic(out / "states.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        write_text_atomic(out / "episodes.jsonl", "".join(json.dumps(e.summary()) + "\n" for e in episodes))
        return {"states": str(out / "states.jsonl"), "num_states": len(rows),
                "deploy_pass_rate": episode_metrics(episodes)["pass_rate"]}

    def _consolidate(self, folder: Path, policy: str, r: int) -> dict:
        listing = folder / "experiences.list"  # this round's extraction; else the configured experience
        task = replace(self.cfg.task, context_path=str(listing) if listing.is_file() else self.cfg.task.context_path)
        states = folder / "deploy" / "states.jsonl"
        game = replace(self.cfg.game, states_path=str(states) if states.is_file() else self.cfg.game.states_path)
        if game.states_path is None:
            raise ConfigError(f"{folder}: nothing to consolidate on: no deploy/states.jsonl (add 'deploy' to "
                              f"oel.phases or set game.states_path)")
        cfg = self._round_cfg(folder, "consolidate", policy, task=task, game=game)
        summary = run_distill(cfg)
        return {"policy_after": str(latest_checkpoint(cfg.run_dir)[1] / "model"), "eval": summary["eval"]}


def _best_experiences(scores_csv: Path, count: int) -> list[str]:
    """The `count` best experience files of an extraction (held-out score, then shorter), one per
    distinct text."""
    try:
        rows = [r for r in csv.DictReader(io.StringIO(read_text(scores_csv))) if int(r["step"]) > 0
                and int(r["chars"]) > 0]
        rows.sort(key=lambda r: (-float(r["heldout_score"]), int(r["chars"]), int(r["step"]), int(r["seed"])))
        if not all(isinstance(r["path"], str) and r["path"] for r in rows):  # a torn last row
            raise ValueError("no path")
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{scores_csv}: expected the columns seed, step, heldout_score, chars, path with numbers "
                        f"(as opcd extract writes them)") from None
    chosen, texts = [], set()
    for row in rows:
        text = Path(row["path"]).read_text()
        if text not in texts:
            chosen.append(row["path"])
            texts.add(text)
        if len(chosen) == count:
            break
    return chosen


def run_oel(cfg: DistillConfig) -> dict:
    return OnlineExperientialLearning(cfg).run()
