"""Faults: a run SIGKILLed at a random moment resumes exactly; a worker that dies ends the run with
one line and the last checkpoint still resumes; SIGTERM is one line and SIGKILL of the driver alone
leaves no Ray process; too many non-finite steps in a row stop the run.

The first three drive `python -m opcd.cli distill` in a subprocess that leads its own session, so the
driver, Ray's daemons and the workers it starts can all be found (by session id) and killed
together, without touching any other Ray instance on the machine. The last runs the trainer's
loop on fake worker groups, no Ray.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opcd import metrics as M
from opcd.runs.checkpoint import latest_checkpoint
from opcd.config import LossConfig, TrainerConfig
from opcd.errors import TrainingError
from opcd.protocol import Example, Generation, SamplingParams, TeacherScores
from opcd.domains.sources import PromptSource
from opcd.trainer import Trainer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
RUN_TIMEOUT_S = 240  # one CLI run takes 30-60 s on 2 busy cores; most of it is starting Ray


# -- running the CLI in its own session ------------------------------------------------------------

def _command(runs_dir: Path, model: Path, save_freq: int, ranks: int = 1, **extra) -> list[str]:
    overrides = {"ray.ranks_per_group": ranks, "model.path": model, "trainer.runs_dir": runs_dir, "trainer.exp_name": "run",
                 "trainer.batch_size": 4, "trainer.micro_batch_size": 4, "trainer.lr": 3e-3,
                 "trainer.total_training_steps": STEPS, "trainer.save_freq": save_freq,
                 "trainer.eval_before": "false", "trainer.eval_after": "false", "trainer.loggers": "[jsonl]",
                 "trainer.num_threads": 1, "rollout.max_response_length": 8, "loss.kl_topk": 16, **extra}
    return [sys.executable, "-m", "opcd.cli", "distill", *(f"{k}={v}" for k, v in overrides.items())]


@pytest.fixture
def launch(tmp_path):
    """Start CLI runs as session leaders; whatever is left of their sessions is killed at teardown."""
    started: list[subprocess.Popen] = []
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a private local Ray

    def start(command: list[str], name: str, **extra_env: str) -> subprocess.Popen:
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
            proc = subprocess.Popen(command, cwd=REPO, env={**env, **extra_env}, stdout=out, stderr=err,
                                    start_new_session=True)
        proc.out, proc.err = logs / f"{name}.out", logs / f"{name}.err"
        started.append(proc)
        return proc

    yield start
    for proc in started:
        for pid in _session(proc.pid):
            _kill(pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _session(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session `sid` (zombies excluded)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
            if int(session) == sid and state != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError):
            continue  # exited while we looked
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {path} appeared:\n{_tail(proc.err)}"
        assert time.monotonic() < deadline, f"{path} did not appear within {RUN_TIMEOUT_S} s"
        time.sleep(0.02)


def _wait_session_gone(sid: int, seconds: float = 30) -> dict[int, str]:
    deadline = time.monotonic() + seconds
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not finish within {RUN_TIMEOUT_S} s:\n{_tail(proc.err)}")


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:])


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("timing/", "perf/"))} for row in rows]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"global_step_{step}" / "model" / "model.safetensors")


# -- 1. SIGKILL at a random moment, then resume ----------------------------------------------------

@pytest.mark.parametrize("ranks", [1, 2])
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_model, launch, ranks):
    """Guards exact resume after a hard kill (no Python cleanup runs): the killed-and-resumed run
    must end with the same weights and step metrics as an uninterrupted one, its metrics must hold
    each step once, no half-written checkpoint folder may survive, and killing the driver's session
    must leave none of its Ray processes behind. The kill lands a seeded-random delay after a
    seeded-random checkpoint, inside the next step (timing jitter sometimes puts it inside a
    checkpoint write); the delay is short enough that the run cannot have finished. With 2 ranks
    (FSDP2, gloo) every checkpoint is sharded, a file per rank, and the same must hold."""
    rng = random.Random(8)
    kill_after, delay = rng.choice([2, 3]), rng.uniform(0.0, 0.5)
    straight = launch(_command(tmp_path / "straight", tiny_model, save_freq=1, ranks=ranks), "straight")
    killed = launch(_command(tmp_path / "killed", tiny_model, save_freq=1, ranks=ranks), "killed")
    run_dir = tmp_path / "killed" / "run"

    _wait_for(run_dir / f"global_step_{kill_after}" / "COMPLETE", killed)
    time.sleep(delay)
    assert any(cmd.startswith("ray::StudentWorker") for cmd in _session(killed.pid).values())
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert _wait_session_gone(killed.pid) == {}, "Ray processes of the killed run outlived it"
    step, _ = latest_checkpoint(run_dir)
    assert kill_after <= step < STEPS

    resumed = launch(_command(tmp_path / "killed", tiny_model, save_freq=1, ranks=ranks), "resumed")
    assert _finish(resumed) == 0, _tail(resumed.err)
    assert f"resumed {run_dir} from step {step}" in resumed.out.read_text()
    assert _finish(straight) == 0, _tail(straight.err)

    a, b = _weights(tmp_path / "straight" / "run", STEPS), _weights(run_dir, STEPS)
    assert a.keys() == b.keys()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    rows = _metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert rows == _metrics(tmp_path / "straight" / "run")
    assert sorted(p.name for p in run_dir.glob(".global_step_*.tmp")) == []


# -- 2. a worker process dies ----------------------------------------------------------------------

def test_dead_student_worker_ends_the_run_with_one_line_and_the_checkpoint_resumes(tmp_path, tiny_model, launch):
    """Guards the worker-death path: when a worker's process is killed (here SIGKILL, as the OOM
    killer would), the driver must not hang or dump a Ray traceback; it must end with one line
    naming the group, the rank, the call and why, exit non-zero, leave no Ray process behind, and
    the same command must then resume from the last complete checkpoint and finish."""
    command = _command(tmp_path, tiny_model, save_freq=2)
    run_dir = tmp_path / "run"
    doomed = launch(command, "doomed")
    _wait_for(run_dir / "global_step_2" / "COMPLETE", doomed)
    student = [pid for pid, cmd in _session(doomed.pid).items() if cmd.startswith("ray::StudentWorker")]
    assert len(student) == 1, _session(doomed.pid)
    os.kill(student[0], signal.SIGKILL)

    assert _finish(doomed) == 2
    last = doomed.err.read_text().strip().splitlines()[-1]
    assert re.fullmatch(rf"opcd: error: student worker rank 0 on node \S+ \(.+\) died during \w+: its process "
                        rf"\(pid {student[0]}\) exited unexpectedly.*; last intact checkpoint: {run_dir}/global_step_[24] "
                        r"\(run the same command to resume\)", last), last
    assert _wait_session_gone(doomed.pid) == {}, "Ray processes of the failed run outlived it"
    assert latest_checkpoint(run_dir)[0] in (2, 4)

    rerun = launch(command, "rerun")
    assert _finish(rerun) == 0, _tail(rerun.err)
    assert re.search(rf"resumed {run_dir} from step [24]\b", rerun.out.read_text())
    assert json.loads((run_dir / "summary.json").read_text())["final_step"] == STEPS
    assert [row["step"] for row in _metrics(run_dir)] == list(range(1, STEPS + 1))


# -- 2b. one rank of several fails: the run ends at once, naming the rank that caused it -------------

FAIL_AT_STEP = 3  # after the checkpoint of step 2
END_WITHIN_S = 60  # from the last checkpoint before the fault to the run's exit (issue 22 §3)


def _failing_run(tmp_path: Path, tiny_model: Path, launch, ranks: int, action: str, rank: int):
    """A run whose rank `rank` fails (`action`: raise or kill, opcd/runtime/faults.py) in the update of
    step FAIL_AT_STEP; -> (process, run folder, seconds from step 2's checkpoint to the exit)."""
    command = _command(tmp_path / "failing", tiny_model, save_freq=2, ranks=ranks)
    doomed = launch(command, f"failing-{action}", OPCD_TEST_FAULT=f"student:update:{rank}:{FAIL_AT_STEP}:{action}")
    run_dir = tmp_path / "failing" / "run"
    _wait_for(run_dir / "global_step_2" / "COMPLETE", doomed)
    saved = time.monotonic()
    try:
        doomed.wait(timeout=END_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end within {END_WITHIN_S} s of the fault:\n{_tail(doomed.err)}")
    return doomed, run_dir, time.monotonic() - saved


def _plain_rerun_resumes_exactly(tmp_path: Path, tiny_model: Path, launch, ranks: int, straight=None) -> None:
    """The same command without the fault resumes from step 2 and ends as an uninterrupted run does."""
    run_dir = tmp_path / "failing" / "run"
    rerun = launch(_command(tmp_path / "failing", tiny_model, save_freq=2, ranks=ranks), "rerun")
    assert _finish(rerun) == 0, _tail(rerun.err)
    assert f"resumed {run_dir} from step 2" in rerun.out.read_text()
    assert [row["step"] for row in _metrics(run_dir)] == list(range(1, STEPS + 1))
    if straight is not None:
        assert _finish(straight) == 0, _tail(straight.err)
        a, b = _weights(tmp_path / "straight" / "run", STEPS), _weights(run_dir, STEPS)
        assert [name for name in a if not torch.equal(a[name], b[name])] == []
        assert _metrics(run_dir) == _metrics(tmp_path / "straight" / "run")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("ranks", [2, 4])
def test_a_rank_that_raises_in_update_ends_the_run_at_once_naming_it(tmp_path, tiny_model, launch, ranks):
    """Regression (issue 22 §3): the driver fetched results rank by rank, so when the last rank raised
    rank 0 sat in a collective and the run hung until the collective timeout (10 h). The run must end
    within a minute with one line naming the rank, its node, the method, the error's last line and
    the last intact checkpoint, leave no Ray process, and a plain rerun must resume exactly."""
    straight = launch(_command(tmp_path / "straight", tiny_model, save_freq=2, ranks=ranks), "straight")
    doomed, run_dir, seconds = _failing_run(tmp_path, tiny_model, launch, ranks, "raise", ranks - 1)
    assert doomed.returncode == 2
    last = doomed.err.read_text().strip().splitlines()[-1]
    assert re.fullmatch(rf"opcd: error: student worker rank {ranks - 1} on node \S+ \(.+\) failed in update: "
                        rf"RuntimeError: injected fault \(OPCD_TEST_FAULT\): student rank {ranks - 1} raises in call "
                        rf"{FAIL_AT_STEP} of update; last intact checkpoint: {run_dir}/global_step_2 "
                        r"\(run the same command to resume\)", last), last
    print(f"{ranks} ranks, a rank raises: the run ended {seconds:.1f} s after step 2's checkpoint")
    assert _wait_session_gone(doomed.pid) == {}, "Ray processes of the failed run outlived it"
    _plain_rerun_resumes_exactly(tmp_path, tiny_model, launch, ranks, straight)


@pytest.mark.timeout(900)
def test_sigkill_of_rank_1_names_the_dead_rank_not_the_survivors_symptom(tmp_path, tiny_model, launch):
    """Regression (issue 24 §3): SIGKILL of student rank 1 ended with `student worker rank 0 failed in
    update: RuntimeError: [...gloo...] Read error`, the survivor's symptom. The dead rank comes first,
    with its node; rank 0's collective error follows as a consequence."""
    doomed, run_dir, seconds = _failing_run(tmp_path, tiny_model, launch, 2, "kill", 1)
    assert doomed.returncode == 2
    last = doomed.err.read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"opcd: error: student worker rank 1 on node \S+ \(.+\) died during update: its process "
                        r"\(pid \d+\) exited unexpectedly \(killed by a signal - SIGKILL, .*\)"
                        r"(; rank 0 failed in update as a consequence: .*)?"
                        rf"; last intact checkpoint: {run_dir}/global_step_2 \(run the same command to resume\)",
                        last), last
    print(f"2 ranks, SIGKILL of rank 1: the run ended {seconds:.1f} s after step 2's checkpoint; line: {last}")
    assert _wait_session_gone(doomed.pid) == {}, "Ray processes of the failed run outlived it"
    _plain_rerun_resumes_exactly(tmp_path, tiny_model, launch, 2)


# -- 3. SIGTERM, and SIGKILL of the driver alone ---------------------------------------------------

def test_sigterm_is_one_line_and_a_killed_driver_leaves_no_ray_process(tmp_path, tiny_model, launch):
    """Guards two ways a run ends from outside. SIGTERM (a scheduler, `timeout`, `kill`) used to end
    with rc -6 and a Ray C++ stack dump: it must give exit 143, one line, no stack, a resumable
    checkpoint and no Ray process left. SIGKILL of the driver process alone (not its whole session)
    used to leave Ray's dashboard and runtime-env agents running forever."""
    # long runs keeping every checkpoint: on a busy machine one run may be many steps ahead of the other
    # by the time both have saved step 1, and must neither finish nor drop that checkpoint before the signal
    long_run = {"trainer.total_training_steps": 1000, "trainer.keep_last_n": 0}
    termed = launch(_command(tmp_path / "termed", tiny_model, save_freq=1, **long_run), "termed")
    killed = launch(_command(tmp_path / "killed", tiny_model, save_freq=1, **long_run), "killed")
    for proc, name in ((termed, "termed"), (killed, "killed")):
        _wait_for(tmp_path / name / "run" / "global_step_1" / "COMPLETE", proc)
    assert any(cmd.startswith("ray::RuntimeEnvAgent") for cmd in _session(killed.pid).values())
    os.kill(termed.pid, signal.SIGTERM)
    os.kill(killed.pid, signal.SIGKILL)

    assert _finish(termed) == 143
    err = termed.err.read_text()
    assert err.strip().splitlines()[-1] == ("opcd: terminated (SIGTERM) (the last complete checkpoint is kept; "
                                            "run the same command to resume)")
    assert "Traceback" not in err and "*** SIG" not in err and "stack trace" not in err.lower()
    assert latest_checkpoint(tmp_path / "termed" / "run")[0] >= 1
    assert not (tmp_path / "termed" / "run" / "opcd.lock").exists()
    assert _wait_session_gone(termed.pid) == {}, "Ray processes of the terminated run outlived it"
    killed.wait()
    assert _wait_session_gone(killed.pid) == {}, "Ray processes of the SIGKILLed driver outlived it"


# -- 4. non-finite steps (controller logic, fake worker groups) ------------------------------------

class _FakeStudent:
    """Answers the trainer's calls like the student group, with `skipped` flags scripted per step."""

    def __init__(self, skipped: list[int], gpu: list[dict] | None = None):
        self.skipped = list(skipped)
        self.gpu = gpu or [None]  # each rank's answer to gpu_memory
        self.updates = 0
        self.saved = []
        self.loaded = []

    def generate(self, prompts, params, seed):
        ids = torch.full((len(prompts), 3), 5)
        return Generation(ids, torch.ones(len(prompts), 3, dtype=torch.bool),
                          torch.zeros(len(prompts), 3, params.record_topk, dtype=torch.long))

    def gather(self, method, *args):
        match method.__name__:
            case "update":
                self.updates += 1
                skipped = float(self.skipped[self.updates - 1])
                return {"loss": 0.1, "student_mass": 0.9, "teacher_mass": 0.8, "entropy": 1.0,
                        "grad_norm": float("nan") if skipped else 1.0, "lr": 1e-3, "skipped": skipped}
        return None

    def call(self, method, *args):
        if method.__name__ == "start_save":
            self.saved.append(Path(args[0]).name)
        if method.__name__ == "load":
            self.loaded.append((Path(args[0]).name, args[1]))
        if method.__name__ == "start_save":
            return [{}]  # written at once, like one rank's save
        return self.gpu if method.__name__ == "gpu_memory" else [None]


class _FakeTeacher:
    def call(self, method, *args):
        return [{}]  # a CPU worker: no reading

    def gather(self, method, request):
        b, t = request.response_ids.shape
        return TeacherScores(logprobs=torch.zeros(b, t, 4), entropy=torch.ones(b, t),
                             support_ids=torch.zeros(b, t, 4, dtype=torch.long))


class _FakeTokenizer:
    pad_token_id = 0

    def batch_decode(self, ids, skip_special_tokens: bool):
        return ["x"] * len(ids)


class _FakeTask:
    def score(self, text: str, row: dict) -> float:
        return 0.0


class _Recorder:
    def __init__(self):
        self.steps = []

    def log(self, metrics: dict, step: int) -> None:
        self.steps.append(step)


def _trainer(tmp_path: Path, skipped: list[int], limit: int, save_freq: int = 0, gpu=None) -> Trainer:
    cfg = TrainerConfig(total_training_steps=len(skipped), batch_size=2, micro_batch_size=2, save_freq=save_freq,
                        max_consecutive_nonfinite=limit, loggers=["jsonl"])
    examples = [Example({"i": i}, [1, 2], [1, 2, 3]) for i in range(4)]
    source = PromptSource(examples, cfg.batch_size, 1, cfg.seed, _FakeTask(), _FakeTokenizer())
    return Trainer(cfg, LossConfig(kl_topk=4), SamplingParams(max_new_tokens=3, record_topk=4), source,
                   _FakeStudent(skipped, gpu), _FakeTeacher(), tmp_path)


def test_too_many_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    """Guards the non-finite stop: a run whose updates keep being skipped (NaN gradients) must end
    with a TrainingError naming the step and the setting instead of logging NaNs forever, and a
    finite step in between must reset the count (else it would stop at step 4, not 6)."""
    trainer, tracker = _trainer(tmp_path, skipped=[1, 1, 0, 1, 1, 1, 0, 0], limit=3), _Recorder()
    with pytest.raises(TrainingError, match=r"^step 6: 3 consecutive steps .*trainer\.max_consecutive_nonfinite=3"):
        trainer.fit(tracker, start_step=0)
    assert tracker.steps == [1, 2, 3, 4, 5, 6]
    assert trainer.student.saved == []  # the failing step is not checkpointed (save_freq 0: only the end)


def test_nonfinite_count_survives_a_resume(tmp_path):
    """Guards the count across a restart: two skipped steps, a checkpoint, a resume, and one more
    skipped step must reach a limit of 3 (a count reset by every restart would never stop a run
    that crashes and is resumed in a loop)."""
    first = _trainer(tmp_path, skipped=[0, 1, 1], limit=3, save_freq=3)
    first.fit(_Recorder(), start_step=0)
    again = _trainer(tmp_path, skipped=[1, 1, 1, 1], limit=3)  # 4 steps: resumes after step 3
    assert again.resume() == 3
    with pytest.raises(TrainingError, match=r"^step 4: 3 consecutive"):
        again.fit(_Recorder(), start_step=3)


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, caplog):
    """Guards the silent resume from damaged bytes (issue: flipped bytes in the latest checkpoint
    resumed and reported success): the trainer names the damaged checkpoint, resumes from the newest
    intact one, and says that its optimizer state is gone (only the newest checkpoint keeps it)."""
    _trainer(tmp_path, skipped=[0, 0, 0], limit=3, save_freq=1).fit(_Recorder(), start_step=0)
    state = tmp_path / "global_step_3" / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:-5])  # truncated
    again = _trainer(tmp_path, skipped=[0, 0, 0, 0], limit=3)
    with caplog.at_level("WARNING", logger="opcd"):
        assert again.resume() == 2
    assert again.student.loaded == [("global_step_2", False)]
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == (f"checkpoint {tmp_path / 'global_step_3'} is damaged (trainer_state.json does not match its "
                        f"checksum (flipped or truncated bytes)); falling back to the previous one")
    assert "global_step_2 holds no optimizer state" in lines[-1]


def test_each_groups_gpu_memory_is_logged_per_step_and_absent_on_cpu(tmp_path):
    """perf/<group>_gpu_* is the largest rank's reading; a group that reports nothing (CPU) logs nothing."""
    ranks = [{"peak_allocated_gb": 3.0, "peak_reserved_gb": 4.0}, {"peak_allocated_gb": 5.0, "peak_reserved_gb": 4.5}]
    metrics = _trainer(tmp_path, skipped=[0], limit=3, gpu=ranks).step(1)
    assert metrics[M.PERF_STUDENT_GPU_PEAK] == 5.0 and metrics[M.PERF_STUDENT_GPU_RESERVED] == 4.5
    assert not any(key.startswith("perf/teacher_gpu") for key in metrics)
    assert not any("gpu" in key for key in _trainer(tmp_path, skipped=[0], limit=3).step(1))
