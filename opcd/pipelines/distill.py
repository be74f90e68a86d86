"""`opcd distill`: on-policy context distillation, from a validated config to a trained run folder.

Set-up order matters: everything a user can get wrong (context file, data rows, tokenizer mismatch)
is checked on the driver before Ray starts or any worker loads a model.

    opcd distill                                   # CPU demo: SmolLM2-135M learns to answer in French
    opcd distill task=medmcqa model=hf model.path=Qwen/Qwen2.5-7B-Instruct trainer=paper
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from opcd.checkpoint import latest_checkpoint, write_text_atomic
from opcd.config import DistillConfig, to_yaml
from opcd.contexts import ContextSource, load_context
from opcd.data import load_rows
from opcd.errors import DataError
from opcd.evaluation import EvalResult, evaluate, evaluate_games
from opcd.games.play import GamePlayer
from opcd.games.registry import make_game
from opcd.games.seeds import heldout_seeds
from opcd.games.states import MoveFormat, read_states, state_examples
from opcd.models import check_same_tokenizer, check_same_vocab_size, load_tokenizer, resolve_model
from opcd import metrics as M
from opcd.prompts import encode_chat, token_counter
from opcd.report import write_report
from opcd.protocol import SamplingParams
from opcd.tasks import get_task
from opcd.sources import Example, GameSource, PromptSource
from opcd.tracking import Tracker
from opcd.trainer import Trainer
from opcd.workers.group import WorkerGroup, init_ray
from opcd.workers.placement import make_pools, remove_pools
from opcd.workers.spec import TrainSpec, WorkerSpec
from opcd.workers.student import StudentWorker
from opcd.workers.frozen import FrozenModelWorker

log = logging.getLogger("opcd")
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_user_path(path: str) -> str:
    """Relative paths are tried against the working directory, then the opcd checkout (so
    `system_prompts/french.txt` works from anywhere with an editable install)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or not (REPO_ROOT / path).exists():
        return str(candidate)
    return str(REPO_ROOT / path)


def build_examples(rows: list[dict], task, context: ContextSource, tokenizer, max_prompt_length: int,
                   seed: int, enable_thinking: bool | None, label: str) -> list[Example]:
    examples, dropped = [], 0
    for index, row in enumerate(rows):
        student_messages = task.student_messages(row)
        student = encode_chat(tokenizer, student_messages, enable_thinking)
        teacher = encode_chat(tokenizer, context.teacher_messages(student_messages, index, seed), enable_thinking)
        if max(len(student), len(teacher)) > max_prompt_length:
            dropped += 1
            continue
        examples.append(Example(row, student, teacher))
    if dropped:
        log.warning("%s: dropped %d of %d rows whose prompt is over task.max_prompt_length=%d",
                    label, dropped, len(rows), max_prompt_length)
    if not examples:
        raise DataError(f"{label}: no usable rows ({dropped} over task.max_prompt_length={max_prompt_length})")
    return examples


def sampling(cfg: DistillConfig, evaluation: bool) -> SamplingParams:
    r = cfg.rollout
    if evaluation:
        return SamplingParams(r.eval_temperature, r.eval_top_p, r.eval_top_k, r.max_response_length)
    record = cfg.loss.kl_topk if cfg.loss.kl_loss_type == "full" and cfg.loss.kl_topk > 0 else 0
    return SamplingParams(r.temperature, r.top_p, r.top_k, r.max_response_length, record_topk=record)


def build_player(cfg: DistillConfig, tokenizer) -> GamePlayer:
    """The text game of `cfg.game` (its id and options are checked here, before any model loads)."""
    g = cfg.game
    make_game(g.name, max_steps=g.max_steps, **g.options)
    return GamePlayer(lambda: make_game(g.name, max_steps=g.max_steps, **g.options), tokenizer, g.max_steps, g.mode,
                      cfg.task.enable_thinking, cfg.task.max_prompt_length)


def vllm_kwargs(cfg: DistillConfig) -> dict:
    """The student's vLLM engine (rollout.backend=vllm): a context long enough for every prompt."""
    r = cfg.rollout
    if r.backend == "hf":
        return {}
    length = cfg.task.max_prompt_length + r.max_response_length
    if cfg.task.name == "textgame" and cfg.game.mode == "trajectory":
        length = cfg.task.max_prompt_length + cfg.game.max_steps * (r.max_response_length + 256)
    return {
        "max_model_len": length, "seed": cfg.trainer.seed, "gpu_memory_utilization": r.vllm_gpu_memory_utilization,
        "cpu_kv_cache_gb": r.vllm_cpu_kv_cache_gb,
        # vLLM refuses more log-probs per token than this (default 20); the support is the policy's top-k
        "max_logprobs": max(cfg.loss.kl_topk, 20),
        "enforce_eager": r.vllm_enforce_eager if r.vllm_enforce_eager is not None else cfg.ray.gpus_per_node == 0}


def teacher_ranks(cfg: DistillConfig) -> int:
    return cfg.ray.teacher_ranks or cfg.ray.ranks_per_group


@contextmanager
def reserved_pools(ranks: dict[str, int], ray_cfg):
    """The groups' placement pools (opcd/workers/placement.py) for the duration of the block."""
    pools = make_pools(ranks, ray_cfg.gpus_per_node > 0, ray_cfg.placement)
    try:
        yield pools
    finally:
        remove_pools(pools.values())


def worker_spec(cfg: DistillConfig, path: str) -> WorkerSpec:
    """The spec of a worker holding the model at `path` (student or frozen), from the config."""
    m, t = cfg.model, cfg.trainer
    return WorkerSpec(model_path=path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                      attn_implementation=m.attn_implementation, cpu_offload=m.cpu_offload, num_threads=t.num_threads,
                      temperature=cfg.rollout.temperature, micro_batch_size=t.micro_batch_size,
                      micro_batch_tokens=t.micro_batch_tokens, lm_head_chunk_size=cfg.loss.lm_head_chunk_size,
                      padding_free=t.padding_free)


def train_spec(cfg: DistillConfig, objective: str | None = None) -> TrainSpec:
    """The student's training settings; `objective` replaces loss.kl_loss_type (off-policy)."""
    t = cfg.trainer
    return TrainSpec(lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                     kl_loss_type=objective or cfg.loss.kl_loss_type, support_mode=cfg.loss.support_mode,
                     aggregation=cfg.loss.aggregation, activation_checkpointing=cfg.model.activation_checkpointing,
                     rollout_backend=cfg.rollout.backend, vllm=vllm_kwargs(cfg))


@dataclass
class Prepared:
    """Everything checked and built on the driver before any worker starts."""

    student_path: str
    teacher_path: str
    tokenizer: object
    context: ContextSource
    source: PromptSource | GameSource  # the on-policy source of the task
    run_eval: Callable  # run_eval(who, group, side) -> EvalResult on the held-out set


def prepare(cfg: DistillConfig) -> Prepared:
    student_path = resolve_model(cfg.model.path)
    teacher_path = resolve_model(cfg.model.teacher_path) if cfg.model.teacher_path else student_path
    tokenizer = load_tokenizer(student_path, cfg.model.trust_remote_code)
    if teacher_path != student_path:
        _check_teacher(cfg, tokenizer, student_path, teacher_path)
    context = load_context(cfg.task.context_kind, resolve_user_path(cfg.task.context_path),
                           cfg.task.experience_max_length, token_counter(tokenizer))
    setup = _game_setup if cfg.task.name == "textgame" else _prompt_setup
    source, run_eval = setup(cfg, tokenizer, context)
    return Prepared(student_path, teacher_path, tokenizer, context, source, run_eval)


def run_distill(cfg: DistillConfig, prepared: Prepared | None = None, source=None, objective: str | None = None,
                teacher_scores_needed: bool = True) -> dict:
    """On-policy distillation; the off-policy baseline (opcd/pipelines/offpolicy.py) reuses it with a
    shard `source`, its `objective` (forward, seqkd) and possibly no teacher scoring."""
    run_dir = cfg.run_dir
    prepared = prepared or prepare(cfg)
    source = source or prepared.source
    run_eval, student_path, teacher_path = prepared.run_eval, prepared.student_path, prepared.teacher_path
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    with reserved_pools({"student": cfg.ray.ranks_per_group, "teacher": teacher_ranks(cfg)}, cfg.ray) as pools:
        student = WorkerGroup("student", StudentWorker, {"spec": worker_spec(cfg, student_path),
                                                         "train": train_spec(cfg, objective)},
                              world_size=cfg.ray.ranks_per_group, pool=pools["student"])
        teacher = WorkerGroup("teacher", FrozenModelWorker, {"spec": worker_spec(cfg, teacher_path)},
                              world_size=cfg.ray.ranks_per_group, pool=pools["student"])
        trainer = Trainer(cfg.trainer, cfg.loss, sampling(cfg, evaluation=False), source, student,
                          teacher if teacher_scores_needed else None, run_dir, objective)
        start_step = trainer.resume()
        _trim_metrics(run_dir, start_step)
        tracker = Tracker(cfg.trainer.loggers, run_dir, cfg.trainer.exp_name, json.loads(json.dumps(_plain(cfg))),
                          cfg.trainer.total_training_steps, start_step, cfg.trainer.wandb_project)
        if start_step:
            tracker.message(f"resumed {run_dir} from step {start_step}")
        results = _load_results(run_dir) if start_step else {}
        try:
            if cfg.trainer.eval_before and "student_before" not in results:
                for who, group, side in (("student_before", student, "student"), ("teacher_with_context", teacher, "teacher")):
                    results[who] = _record_eval(run_eval(who, group, side), run_dir, results, tracker)
                    tracker.message(_describe(results[who]))

            def evaluate_during(step: int) -> dict:
                result = _record_eval(run_eval(f"student_step_{step}", student, "student"), run_dir, results, tracker)
                results[f"student_step_{step}"] = result
                return {M.EVAL_DURING: result["score"]}
            final_step = trainer.fit(tracker, start_step, evaluate_during)
            if cfg.trainer.eval_after:
                results["student_after"] = _record_eval(run_eval("student_after", student, "student"), run_dir, results,
                                                        tracker)
                tracker.message(_describe(results["student_after"]))
            tracker.summary({f"eval/{k}/score": v["score"] for k, v in results.items()})
        finally:
            tracker.close()
            student.shutdown()
            teacher.shutdown()
    try:  # the report is a convenience: a plotting problem must not fail a finished run
        write_report([run_dir])
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write the report of %s: %s", run_dir, exc)
    summary = {"run_dir": str(run_dir), "final_step": final_step, "eval": results,
               "checkpoint": str(latest_checkpoint(run_dir)[1]) if latest_checkpoint(run_dir) else None}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def _check_teacher(cfg: DistillConfig, student_tok, student_path: str, teacher_path: str) -> None:
    from transformers import AutoConfig

    teacher_tok = load_tokenizer(teacher_path, cfg.model.trust_remote_code)
    check_same_tokenizer(student_tok, teacher_tok, student_path, teacher_path)
    check_same_vocab_size(AutoConfig.from_pretrained(student_path, trust_remote_code=cfg.model.trust_remote_code),
                          AutoConfig.from_pretrained(teacher_path, trust_remote_code=cfg.model.trust_remote_code),
                          student_path, teacher_path)


def _prompt_setup(cfg: DistillConfig, tokenizer, context: ContextSource):
    """Dataset tasks: the training source over the train rows, and held-out evaluation on the test rows."""
    task = get_task(cfg.task.name)
    train_rows = load_rows(resolve_user_path(cfg.task.train_data), cfg.task.train_split)
    test_rows = load_rows(resolve_user_path(cfg.task.test_data), cfg.task.test_split,
                          cfg.trainer.eval_limit if cfg.trainer.eval_limit > 0 else None)
    build = dict(task=task, context=context, tokenizer=tokenizer, max_prompt_length=cfg.task.max_prompt_length,
                 seed=cfg.trainer.seed, enable_thinking=cfg.task.enable_thinking)
    examples = build_examples(train_rows, label=cfg.task.train_data, **build)
    test_examples = build_examples(test_rows, label=cfg.task.test_data, **build)
    source = PromptSource(examples, cfg.trainer.batch_size, cfg.rollout.n, cfg.trainer.seed, task, tokenizer)

    def run_eval(who: str, group, side: str) -> EvalResult:
        prompts = [e.student_prompt if side == "student" else e.teacher_prompt for e in test_examples]
        return evaluate(who, group, prompts, [e.row for e in test_examples], task, tokenizer,
                        sampling(cfg, evaluation=True), seed=cfg.trainer.seed + 7919)
    return source, run_eval


def _game_setup(cfg: DistillConfig, tokenizer, context: ContextSource):
    """Text games: episodes from training seeds (or stored states), pass rates on the fixed held-out
    seeds (the teacher plays with the first experience file)."""
    player = build_player(cfg, tokenizer)
    if cfg.game.states_path:  # OEL: the states a policy visited without experience, answered afresh each step
        rows = read_states(resolve_user_path(cfg.game.states_path))
        source = PromptSource(state_examples(rows, player, context, cfg.trainer.seed), cfg.trainer.batch_size,
                              cfg.rollout.n, cfg.trainer.seed, MoveFormat(), tokenizer)
    else:
        source = GameSource(player, context, cfg.game.episodes_per_step, cfg.trainer.seed)
    seeds = heldout_seeds(cfg.game.eval_episodes)

    def run_eval(who: str, group, side: str) -> EvalResult:
        experience = context.texts[0] if side == "teacher" else None
        return evaluate_games(who, group, player, seeds, sampling(cfg, evaluation=True), cfg.trainer.seed + 7919,
                              experience)
    return source, run_eval


def _record_eval(result: EvalResult, run_dir: Path, results: dict, tracker: Tracker) -> dict:
    with open(run_dir / f"eval_{result.who}.jsonl", "w") as fh:
        for sample in result.samples:
            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
    write_text_atomic(run_dir / "eval.json", json.dumps({**results, result.who: result.summary()}, indent=1))
    tracker.table(f"eval/{result.who}/samples", result.samples)
    return result.summary()


def _load_results(run_dir: Path) -> dict:
    path = run_dir / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _describe(result: dict) -> str:
    return (f"eval {result['who']}: score {result['score']:.3f} over {result['num_items']} items "
            f"({result['mean_response_tokens']:.1f} tokens/response)")


def _trim_metrics(run_dir: Path, start_step: int) -> None:
    """A resumed run re-logs the steps after its checkpoint: drop those lines from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of(line) is not None
            and _step_of(line) <= start_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a crash (it is dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _plain(cfg: DistillConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
