"""The `opcd distill` commands the README and docs/ show: each one is a valid configuration, and one
that changes what the demo learns names a run folder of its own (else it is refused after the demo)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from opcd.config import load_config
from opcd.runs.folder import _flatten, _free, _plain, config_changes

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def distill_commands(text: str) -> list[list[str]]:
    """The `opcd distill ...` commands of a Markdown text, from bash blocks (continuation lines joined,
    comments dropped) and inline code; synopsis lines (`[OVERRIDE ...]`) are not commands."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.split(" #")[0].strip())
    found += re.findall(r"`(opcd distill[^`]*)`", text)
    commands = [shlex.split(c)[2:] for c in found if c.startswith("opcd distill") and "OVERRIDE" not in c]
    return [words for words in commands if not any(w.startswith("--") for w in words)]  # --cfg, --help


def _cases():
    for page in PAGES:
        for overrides in distill_commands(page.read_text()):
            yield pytest.param(overrides, id=f"{page.name}: {' '.join(overrides)[:60]}")


def test_the_parser_finds_the_commands():
    text = ("Run `opcd distill task.language=es trainer.exp_name=es` now.\n```bash\n"
            "opcd distill [--cfg] [OVERRIDE ...]   # synopsis\nopcd distill a=1 \\\n    b=2   # two lines\n```\n")
    assert distill_commands(text) == [["a=1", "b=2"], ["task.language=es", "trainer.exp_name=es"]]
    assert len(list(_cases())) >= 8


@pytest.mark.parametrize("overrides", list(_cases()))
def test_a_documented_command_is_valid_and_does_not_collide_with_the_demo(overrides):
    """Regression: the README's "one override away: opcd distill task.language=es" was refused after the
    demo (same exp_name, changed setting)."""
    demo, cfg = load_config([]), load_config(overrides)
    changed = [key for key, _, _ in config_changes(_flatten(_plain(demo)), _flatten(_plain(cfg)))
               if not _free(key) and key not in cfg.trainer.resume_override]
    if changed:
        assert cfg.trainer.exp_name != demo.trainer.exp_name, (
            f"`opcd distill {' '.join(overrides)}` changes {changed} but runs in the demo's folder "
            f"{demo.run_dir}: give it trainer.exp_name=...")
