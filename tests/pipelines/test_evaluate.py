"""Checkpoint evaluation: best-k mean, caching, baselines, run-config overrides."""

from __future__ import annotations

import json

import pytest

from opcd.config import load_config
from opcd.errors import ConfigError
from opcd.runs.results import best_k_mean


def test_best_k_mean_on_known_numbers():
    scores = {2: 0.40, 4: 0.55, 6: 0.50, 8: 0.61, 10: 0.55}
    best = best_k_mean(scores, 3)
    assert best["steps"] == [8, 4, 10]  # 0.55 tie: the earlier step first
    assert best["mean"] == pytest.approx((0.61 + 0.55 + 0.55) / 3)
    assert best["std"] == pytest.approx(((0.61 - 0.57) ** 2 * 1 + (0.55 - 0.57) ** 2 * 2) ** 0.5 / 3 ** 0.5)
    assert best_k_mean({4: 0.3}, 3) == {"k": 1, "mean": 0.3, "std": 0.0, "steps": [4]}
    with pytest.raises(ValueError):
        best_k_mean({}, 3)


@pytest.mark.slow
def test_evaluate_checkpoints_baselines_and_cache(tmp_path, tiny_model, monkeypatch):
    import ray

    from opcd.pipelines import evaluate as ev
    from opcd.pipelines.distill import run_distill
    from opcd.workers.group import init_ray

    init_ray(None, 8)
    try:
        run_distill(load_config([f"model.path={tiny_model}", f"trainer.runs_dir={tmp_path}", "trainer.exp_name=r",
                                 "trainer.total_training_steps=4", "trainer.save_freq=2", "trainer.batch_size=2",
                                 "trainer.micro_batch_size=2", "trainer.eval_before=false",
                                 "trainer.eval_after=false", "trainer.loggers=[jsonl]",
                                 "rollout.max_response_length=6", "loss.kl_topk=8"]))
        run = tmp_path / "r"
        cfg = ev.load_run_config(run, ["evaluate.limit=3"])
        summary = ev.run_evaluate(run, cfg)
        assert set(summary["checkpoints"]) == {2, 4}
        assert set(summary["baselines"]) == {"base_without_context", "base_with_context"}
        assert summary["best"]["k"] == 2 and sorted(summary["best"]["steps"]) == [2, 4]
        assert len((run / "evaluation" / "results.csv").read_text().splitlines()) == 1 + 4
        samples = json.loads((run / "evaluation" / "step_4.json").read_text())["samples"]
        assert len(samples) == 3

        def no_workers(*args, **kwargs):
            raise AssertionError("a cached result was evaluated again")

        monkeypatch.setattr(ev, "frozen_model_group", no_workers)
        assert ev.run_evaluate(run, cfg) == summary
        with pytest.raises(ConfigError, match="no complete checkpoint for steps \\[3\\]"):
            ev.run_evaluate(run, ev.load_run_config(run, ["evaluate.steps=[3]"]))
    finally:
        ray.shutdown()


def test_run_config_overrides_are_checked(tmp_path):
    from opcd.config import to_yaml
    from opcd.pipelines.evaluate import load_run_config

    (tmp_path / "config.yaml").write_text(to_yaml(load_config([])))
    assert load_run_config(tmp_path, ["evaluate.limit=7"]).evaluate.limit == 7
    with pytest.raises(ConfigError, match="evaluate.nope"):
        load_run_config(tmp_path, ["evaluate.nope=1"])
    with pytest.raises(ConfigError, match="dotted key=value"):
        load_run_config(tmp_path, ["task=math"])
    with pytest.raises(ConfigError, match="not an opcd run folder"):
        load_run_config(tmp_path / "missing", [])


def test_jobs_cover_checkpoints_context_and_base_model():
    from opcd.pipelines.evaluate import _jobs

    def names(**kw):
        return [(name, side) for name, _, side in _jobs(kw.pop("run", "r"), kw.pop("steps", [2]), "base", **kw)]

    assert names(baselines=False, with_context=False, base_only=False) == [("step_2", "student")]
    assert names(baselines=True, with_context=True, base_only=False) == [
        ("step_2", "student"), ("step_2_with_context", "teacher"),
        ("base_without_context", "student"), ("base_with_context", "teacher")]
    # the base model alone: without the context, and with it only when asked (--eval_prepend_experience / --use_bsl)
    assert names(steps=[], baselines=False, with_context=False, base_only=True) == [("base_without_context", "student")]
    assert names(steps=[], baselines=False, with_context=True, base_only=True) == [
        ("base_without_context", "student"), ("base_with_context", "teacher")]


def test_evaluate_cli_cfg_for_a_run_and_for_a_base_model(tmp_path, capsys):
    import yaml

    from opcd.cli import main
    from opcd.config import to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(load_config(["task=medmcqa"])))
    assert main(["evaluate", "--cfg", str(tmp_path), "evaluate.with_context=true"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["evaluate"]["with_context"] is True
    assert main(["evaluate", "--cfg", "--base", "task=safety", "model=hf", "model.path=some/model",
                 "trainer.exp_name=base-safety"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["task"]["name"] == "safety" and cfg["model"]["path"] == "some/model"
    assert main(["evaluate"]) == 2
    assert "needs a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_base_model_alone_without_and_with_the_context(tmp_path, tiny_model):
    import ray

    from opcd.pipelines import evaluate as ev
    from opcd.workers.group import init_ray

    init_ray(None, 8)
    try:
        cfg = load_config([f"model.path={tiny_model}", f"trainer.runs_dir={tmp_path}", "trainer.exp_name=base",
                           "evaluate.limit=2", "evaluate.with_context=true", "evaluate.baselines=false",
                           "rollout.max_response_length=4"])
        summary = ev.run_evaluate(cfg.run_dir, cfg, base_only=True)
        assert summary["checkpoints"] == {} and summary["best"] is None
        assert set(summary["baselines"]) == {"base_without_context", "base_with_context"}
        assert not (tmp_path / "base" / "config.yaml").exists()  # results only: not mistaken for a run
    finally:
        ray.shutdown()


_BOMB = "\n".join(['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
                  + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]) + "\n"


@pytest.mark.parametrize("content, message", [
    (b"trainer:\n  exp_name: [x\n", "config.yaml: not readable YAML"),  # torn
    (b"", "config.yaml: not a readable config (expected a mapping of sections, found nothing)"),
    (b"- 1\n- 2\n", "config.yaml: not a readable config (expected a mapping of sections, found list)"),
    (b"trainer:\n  exp_name: \xff\n", "config.yaml: not UTF-8 text (byte 0xff at offset 21)"),
    (_BOMB.encode(), "config.yaml: more than 200000 nodes once its aliases are expanded"),
])
def test_evaluate_refuses_a_damaged_config_yaml_in_one_line(tmp_path, capsys, content, message):
    """Bug: a torn/non-UTF-8 config.yaml traced back and an anchor bomb spun for minutes in `opcd evaluate`."""
    from opcd.cli import main

    (tmp_path / "config.yaml").write_bytes(content)
    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opcd: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "evaluation").exists()


@pytest.mark.parametrize("content", [b'{"settings": "k", "score": 0.', b"", b"[1]", b'{"settings": "\xff"}'])
def test_a_damaged_evaluation_cache_is_evaluated_again_with_one_warning(tmp_path, caplog, content):
    from opcd.pipelines.evaluate import _cached

    path = tmp_path / "step_2.json"
    path.write_bytes(content)
    assert _cached(path, "k") is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{path}: ") and warning.endswith("; evaluating again")
    path.write_text('{"settings": "k", "score": 0.5}')
    assert _cached(path, "k") == {"settings": "k", "score": 0.5} and _cached(path, "other") is None


def test_base_into_an_evaluated_run_folder_is_refused_and_its_results_kept(tmp_path, capsys):
    """Bug: `opcd evaluate --base` with a run's exp_name overwrote its evaluation/results.json with
    {"checkpoints": {}}."""
    from opcd.cli import main
    from opcd.runs.checkpoint import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, 2, lambda f: (f / "weights.txt").write_text("2") and None, {"step": 2})
    (run / "evaluation").mkdir()
    results = '{"checkpoints": {"2": 0.5}, "best": null, "baselines": {}}'
    (run / "evaluation" / "results.json").write_text(results)
    assert main(["evaluate", "--base", f"trainer.runs_dir={tmp_path}", "trainer.exp_name=run",
                 "model.path=some/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"opcd: error: opcd evaluate --base: {run} holds a run's checkpoints or their results")
    assert "\n" not in err and (run / "evaluation" / "results.json").read_text() == results
