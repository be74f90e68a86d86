"""tools/prepare_data.py: writes parquet opcd reads back; offline, says what failed and exits 1."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from opcd.tasks.loading import load_rows
from opcd.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_data"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_written_parquet_loads_back(tmp_path):
    tool = _tool()
    rows = [{"content": [{"role": "user", "content": "Q?"}], "answer": "A", "id": 1}]
    failures = tool.prepare([tool.Source("demo", "hf:x/y", {"train": "train"})], tmp_path, None,
                            load=lambda source, split, limit: rows)
    assert failures == []
    assert load_rows(str(tmp_path / "demo_train.parquet")) == rows


def test_offline_lists_every_failure_and_exits_1(tmp_path, monkeypatch, capsys):
    tool = _tool()

    def offline(source, split, limit):
        raise DataError(f"cannot load hub dataset {source!r} split {split!r}: ConnectionError: offline")

    monkeypatch.setattr(tool, "load_rows", offline)
    assert tool.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "failed: hf:openlifescienceai/medmcqa split validation" in err and "ConnectionError" in err
    assert "3 split(s) not written" in err
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind
