"""`opcd extract`'s run folder (opcd/pipelines/extract.py): a lock, seeds reused only with the same model
and settings, its own default folder. Driver-level: every refusal here comes before Ray starts."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from opcd.cli import main
from opcd.config import load_config
from opcd.errors import ConfigError
from opcd.pipelines.extract import check_seed_settings, extract_defaults, read_scores, seed_settings


def _overrides(tmp_path, model) -> list[str]:
    return ["task=math", f"model.path={model}", f"trainer.runs_dir={tmp_path}/runs", "trainer.exp_name=x",
            "extract.seeds=[0]", "extract.stream_items=2"]


def test_default_folder_is_not_the_demo_s():
    """Bug: `opcd extract` wrote into runs/french-demo by default."""
    assert extract_defaults(load_config(["task=math"]), ["task=math"]).trainer.exp_name == "extract-math"
    assert extract_defaults(load_config(["trainer.exp_name=mine"]), ["trainer.exp_name=mine"]).trainer.exp_name == "mine"


def test_a_seed_extracted_with_another_model_is_refused_before_anything_starts(tmp_path, tiny_model, capsys):
    """Bug: seeds "already extracted" were skipped even when the model or settings had changed."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = load_config(_overrides(tmp_path, model))
    seed_dir = cfg.run_dir / "seed_0"
    seed_dir.mkdir(parents=True)
    settings = seed_settings(cfg, str(model), None)
    (seed_dir / "settings.json").write_text(json.dumps(settings))
    (seed_dir / "scores.json").write_text(json.dumps([{"seed": 0, "step": 0, "score": 0.5, "path": "e.txt",
                                                       "length": 0}]))
    check_seed_settings(seed_dir, settings)  # the same: reused
    (model / "config.json").write_text((model / "config.json").read_text().replace("{", '{"note": 1, ', 1))
    assert main(["extract", *_overrides(tmp_path, model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"opcd: error: {seed_dir} was extracted with another model or settings (model (config.json)): "
                   f"to extract again pass trainer.resume=never (the old extraction is moved aside), or pick "
                   f"another trainer.exp_name")
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    with pytest.raises(ConfigError, match=r"\(model \(config.json\), extract \(stream_items\)\)"):
        check_seed_settings(seed_dir, seed_settings(load_config([*_overrides(tmp_path, model),
                                                                 "extract.stream_items=3"]), str(model), None))
    assert not (cfg.run_dir / "opcd.lock").exists()  # the lock was taken and given back


@pytest.mark.parametrize("content", [b"[{\"seed\": 0, \"st", b"", b"{}", b"[{\"seed\": 0}]", b"[\"\xff\"]"])
def test_a_damaged_scores_json_is_one_line(tmp_path, content):
    path = tmp_path / "scores.json"
    path.write_bytes(content)
    with pytest.raises(Exception) as info:
        read_scores(path)
    assert type(info.value).__name__ == "DataError" and str(info.value).startswith(f"{path}: ")
