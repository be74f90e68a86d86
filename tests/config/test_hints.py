"""Misspelt configuration keys: one line with the nearest known key, whether or not the override has `+`."""

import pytest

from opcd.config import CONF_DIR, DistillConfig, load_config, validate
from opcd.config.hints import check_overrides, schema_keys, unknown_key_message
from opcd.errors import ConfigError


@pytest.mark.parametrize("override", ["trainer.total_trainng_steps=3", "+trainer.total_trainng_steps=3",
                                      "++trainer.total_trainng_steps=3", "~trainer.total_trainng_steps"])
def test_typo_names_the_intended_key_instead_of_hydras_plus_advice(override):
    """Regression: Hydra answered a typo with 'To append to your config use +...'."""
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert str(info.value) == ("config: unknown key trainer.total_trainng_steps; "
                               "did you mean trainer.total_training_steps?")


@pytest.mark.parametrize("override, expected", [
    ("trainr.lr=1e-5", "config: unknown key trainr.lr; did you mean trainer.lr?"),
    ("loss.topk=8", "config: unknown key loss.topk; did you mean loss.kl_topk?"),
    ("traner=paper", "config: unknown key traner; did you mean trainer?"),
    ("task=languag", "config: unknown task preset 'languag'; did you mean task=language? "
                     "(presets: language, math, medmcqa, safety, textgame)"),
])
def test_misspelt_sections_and_presets(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert str(info.value) == expected


def test_nothing_close_lists_the_section_keys():
    message = unknown_key_message("trainer.zzz", schema_keys(DistillConfig))
    assert message.startswith("unknown key trainer.zzz (known keys in trainer: async_save, batch_size, eval_after,")
    assert "total_training_steps" in message and "lr" in message.split(": ", 1)[1].split(", ")
    assert unknown_key_message("zz.q", schema_keys(DistillConfig)).startswith(
        "unknown key zz.q (known keys at the top level: evaluate, extract, game, loss,")


def test_valid_overrides_pass():
    check_overrides(["task=math", "trainer.lr=2e-6", "+trainer.seed=3", "loss.kl_topk=8", "hydra.job.name=x"],
                    DistillConfig, CONF_DIR)
    assert load_config(["trainer=paper", "task=medmcqa"]).task.name == "medmcqa"


def test_keys_from_a_saved_config_get_the_hint_too():
    """`opcd evaluate RUN_DIR key=value` validates a merged dict, not Hydra overrides."""
    with pytest.raises(ConfigError, match=r"^config: unknown key evaluate\.limt; did you mean evaluate\.limit\?$"):
        validate({"evaluate": {"limt": 3}})
