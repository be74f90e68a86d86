"""The generated configuration reference: docs/config.md is what the schema says, every key is in it,
and what it reads from the source (comments, Literal choices, `_check` bounds) is read right."""

from pathlib import Path

from opcd.config import reference
from opcd.config.hints import schema_keys
from opcd.config.schema import DistillConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_committed_reference_is_current():
    assert DOC.read_text() == reference.render(), (
        f"docs/config.md is out of date with opcd/config/schema.py or opcd/conf: regenerate it with "
        f"`{reference.REGENERATE}`")


def test_every_key_has_a_row_with_a_description():
    rows = reference.key_rows()
    assert [r[0] for r in rows] == schema_keys(DistillConfig, sections=False)
    undescribed = [key for key, *_, text in rows if not text]
    assert not undescribed, f"schema fields without a comment (their description): {undescribed}"


def test_rows_read_types_defaults_choices_and_bounds():
    rows = {r[0]: r[1:] for r in reference.key_rows()}
    assert rows["loss.support_mode"] == ("choice", "tail", "`partial`, `renorm`, `tail`", "reference default is partial")
    assert rows["rollout.hf_cache"][:3] == ("choice or null", "null", "`dynamic`, `static`, `null`")
    assert rows["trainer.loggers"][:2] == ("list[str]", "[console, jsonl]")
    # an f-string bound: module constants are filled in, values of the instance stay named
    assert rows["rollout.max_response_length"][2] == "an integer in [1, 1048576]"
    assert "{trainer.batch_size * rollout.n}" in rows["trainer.micro_batch_size"][2]
    # comments above a field, in Python words, become its description in YAML words
    assert rows["model.activation_checkpointing"][3].startswith("recompute decoder activations")
    assert "null: on with GPUs" in rows["model.activation_checkpointing"][3]


def test_comment_and_bound_parsing_on_a_small_source():
    source = '''
class _Example:
    # first line above
    # second line above
    a: int = 1
    b: str = "x"  # beside b
    c: int = 0

    def __post_init__(self):
        _check(self.a > 0, "ex.a", self.a, "an integer > 0")
        _check(self.a < LIMIT, "ex.a", self.a, f"below {LIMIT} and {self.c}")
'''
    assert reference.field_comments(source) == {("_Example", "a"): "first line above second line above",
                                                ("_Example", "b"): "beside b", ("_Example", "c"): ""}
    assert reference.checked_bounds(source, {"LIMIT": 7}) == {"ex.a": ["an integer > 0", "below 7 and {c}"]}


def test_presets_are_listed_with_the_keys_they_set():
    presets = dict(reference.preset_rows())
    assert presets["trainer=demo"] == "`trainer.exp_name=french-demo`, `trainer.keep_last_n=2`"
    # a global preset names full keys of other sections
    assert "`rollout.max_response_length=48`" in presets["task=textgame"]
