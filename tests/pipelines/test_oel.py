"""OEL's readers of what its own phases wrote (opcd/pipelines/oel.py): damage is one line."""

from __future__ import annotations

import pytest

from opcd.errors import DataError
from opcd.pipelines.oel import _best_experiences


@pytest.mark.parametrize("content, message", [
    (b"seed,step,heldout_score,chars,path\n0,1,0.5,10", "expected the columns"),  # torn: no path column value
    (b"seed,step\n0,1\n", "expected the columns"),
    (b"seed,step,heldout_score,chars,path\n0,x,0.5,10,a\n", "expected the columns"),
    (b"seed,step,heldout_score,chars,path\n0,1,0.5,10,\xff\n", "not UTF-8 text"),
])
def test_a_damaged_scores_csv_is_one_line(tmp_path, content, message):
    path = tmp_path / "scores.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        _best_experiences(path, 2)
    assert str(info.value).startswith(f"{path}: ")


def test_the_best_distinct_experiences_are_chosen(tmp_path):
    for name, text in (("a", "[exp] one"), ("b", "[exp] one"), ("c", "[exp] two")):
        (tmp_path / name).write_text(text)
    (tmp_path / "scores.csv").write_text("seed,step,heldout_score,chars,path\n"
                                         f"0,0,0.9,0,{tmp_path / 'a'}\n0,1,0.8,9,{tmp_path / 'a'}\n"
                                         f"1,1,0.8,9,{tmp_path / 'b'}\n1,2,0.7,9,{tmp_path / 'c'}\n")
    assert _best_experiences(tmp_path / "scores.csv", 2) == [str(tmp_path / "a"), str(tmp_path / "c")]
