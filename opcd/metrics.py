"""Metric names, in one place, namespaced by phase (what the console, jsonl, tensorboard and wandb show)."""

LOSS_KL = "loss/kl"  # the optimised per-token loss (token mean)
STUDENT_MASS = "loss/student_support_mass"  # mean student probability inside the support
TEACHER_MASS = "loss/teacher_support_mass"
ACTOR_ENTROPY = "actor/entropy"
ACTOR_GRAD_NORM = "actor/grad_norm"
ACTOR_LR = "actor/lr"
ACTOR_SKIPPED = "actor/skipped_nonfinite"  # 1 when this step's update was skipped
TEACHER_ENTROPY = "teacher/entropy"
ROLLOUT_SCORE = "rollout/score"  # task metric of the student's training rollouts (games: pass rate), logged only
GAME_TURNS = "rollout/turns_per_episode"
GAME_INVALID = "rollout/invalid_moves_per_episode"  # answers without a bracketed move
GAME_TOKENS_PER_TURN = "rollout/tokens_per_turn"
ROLLOUT_RESPONSE_LENGTH = "rollout/response_length"
ROLLOUT_PROMPT_LENGTH = "rollout/prompt_length"
ROLLOUT_TEACHER_PROMPT_LENGTH = "rollout/teacher_prompt_length"
ROLLOUT_CLIPPED = "rollout/clip_ratio"  # share of responses that hit max_response_length
PERF_TOKENS_PER_S = "perf/tokens_per_s"  # response tokens per second of the whole step
PERF_MAX_RSS_GB = "perf/driver_max_rss_gb"
PERF_GPU = "perf/{group}_gpu_{reading}"  # group: student | teacher; reading: peak_allocated_gb | peak_reserved_gb
PERF_STUDENT_GPU_PEAK = "perf/student_gpu_peak_allocated_gb"  # per step; absent on CPU
PERF_STUDENT_GPU_RESERVED = "perf/student_gpu_peak_reserved_gb"
# + reading "used_gb_after_<phase>" (rollout | update | sync for the student, score for the teacher): the
# device's memory in use at the end of the phase, vLLM's pools and other processes included
PERF_GPU_USED_MAX = "perf/gpu_used_gb_max"  # the largest of those readings this step, any group and rank
TIMING = "timing/"  # + phase name, seconds
# at checkpoint steps: how long the save held training up (with trainer.async_save: finishing the previous
# checkpoint, if still being written, and staging this one; the writing itself goes on during the next steps)
TIMING_SAVE = TIMING + "save"
EVAL_DURING = "eval/student/score"  # held-out score of the student (no context) every trainer.eval_freq steps
