"""The hardened readers of files opcd writes (opcd/data/files.py): a torn, an empty, a wrong-type and a
non-UTF-8 version of each kind gives one line naming the file (and line) and what was expected."""

from __future__ import annotations

import time

import pytest

from opcd.data.files import read_json, read_jsonl, read_yaml
from opcd.errors import ConfigError, DataError

GOOD_JSONL = '{"step": 1, "loss/kl": 0.5}\n{"step": 2, "loss/kl": 0.4}\n'


def test_a_torn_last_line_is_skipped_with_one_warning_and_the_lines_before_it_are_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(GOOD_JSONL + '{"step": 3, "lo')
    warnings = []
    rows = read_jsonl(path, ("step",), warn=warnings.append)
    assert [row["step"] for row in rows] == [1, 2]
    assert len(warnings) == 1 and f"{path}:3: last line cut short" in warnings[0]


@pytest.mark.parametrize("text, message", [
    ('{"step": 1, "lo\n' + GOOD_JSONL, ":1: not valid JSON (Unterminated string"),  # torn, but not the last
    (GOOD_JSONL + '{"loss/kl": 0.3}\n', ":3: no 'step'; expected a JSON object with 'step'"),
    (GOOD_JSONL + "7\n", ":3: a JSON int, expected a JSON object with 'step'"),
    ('[1, 2]\n' + GOOD_JSONL, ":1: a JSON list, expected a JSON object with 'step'"),
])
def test_a_bad_line_that_is_not_the_last_torn_one_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_jsonl(path, ("step",), warn=pytest.fail)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_an_empty_jsonl_file_has_no_rows(tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    assert read_jsonl(tmp_path / "m.jsonl", ("step",)) == []


@pytest.mark.parametrize("reader", ["jsonl", "json", "yaml"])
def test_non_utf8_bytes_are_one_line(tmp_path, reader):
    path = tmp_path / "f"
    path.write_bytes(b'{"step": 1, "a": "\xff\xfe"}\n')
    read = {"jsonl": lambda: read_jsonl(path, ("step",)), "json": lambda: read_json(path),
            "yaml": lambda: read_yaml(path, ConfigError)}[reader]
    with pytest.raises((DataError, ConfigError), match=r"not UTF-8 text \(byte 0xff at offset 18\)"):
        read()


@pytest.mark.parametrize("text, message", [
    ('{"student_before": {"score": 0.', "not valid JSON (Expecting ',' delimiter at line 1 column 31)"),
    ("", "empty file (expected a JSON object)"),
    ("   \n", "empty file (expected a JSON object)"),
    ("[0.5, 0.6]", "holds a JSON list, expected a JSON object"),
    ('"x"', "holds a JSON str, expected a JSON object"),
    ("[" * 100_000, "not valid JSON"),
])
def test_a_damaged_json_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "eval.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_json(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value) and "\n" not in str(info.value)


def test_a_yaml_anchor_bomb_is_refused_quickly(tmp_path):
    """Bug: a config.yaml of nine nested aliases (9**9 nodes when expanded) made `opcd evaluate` spin
    for minutes; it is refused from the parser's events before anything walks it."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="more than 200000 nodes once its aliases are expanded"):
        read_yaml(path, ConfigError)
    assert time.monotonic() - start < 5


def test_a_yaml_with_a_few_aliases_reads(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("base: &b {lr: 1.0e-5, steps: 3}\nrun: *b\nother: [*b, *b]\n")
    assert read_yaml(path)["other"][1] == {"lr": 1.0e-5, "steps": 3}


@pytest.mark.parametrize("text, message", [
    ("trainer:\n  exp_name: [x\n", "not readable YAML"),
    ("trainer: {a: 1\n", "not readable YAML"),
])
def test_torn_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_yaml(path, ConfigError)
