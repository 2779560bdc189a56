"""`python train.py` / `qlora train` with a bad value for every recipe key: one `error:` line naming the
key, before anything loads. Every leaf key of the default recipe (and of each objective) is given a
value of the wrong type; every key with a fixed set of choices is given one outside it. The keys that
take any text (paths, names) are listed with the check that stands for them."""
import pytest
from omegaconf import OmegaConf

from qlora.train import compose_recipe
from qlora.train.command import check_overrides
from qlora.train.recipe_checks import _CHOICES
from qlora.train.schema import ConfigError

# Keys whose value is any text or any path: checked where they are read (tests named beside them).
FREE_TEXT = {
    "model.name_or_path": "test_reliability::test_missing_model_path_is_named_before_any_hub_lookup",
    "model.revision": "a Hub revision, checked by the Hub", "model.attn_implementation": "transformers' own check",
    "model.adapter": "test_preference_train: a missing adapter is refused", "model.dtype": "its choices, below",
    "data.source": "test_reliability::test_a_missing_data_file_is_one_line_before_the_model_loads...",
    "data.eval_source": "the same check as data.source", "data.split": "datasets' split syntax",
    "data.eval_split": "datasets' split syntax", "trainer.run_name": "any folder name", "trainer.resume": "test_reliability",
    "trainer.device": "test_reliability::test_settings_this_machine_cannot_honour_are_refused_before_loading",
    "logger.project": "a wandb project name", "logger.entity": "a wandb entity", "logger.name": "a wandb run name",
    "quantization.method": "its choices, below",
    "lora.target_modules": "test_lora::test_bad_target_module_name (a name no module has)",
}


def leaves(cfg, prefix=""):
    for key, value in cfg.items():
        if OmegaConf.is_dict(value):
            if "_target_" in value:  # optimizer, scheduler, data.format: checked against their target
                continue
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def typed_leaves():
    seen = {}
    for objective in ("sft", "dpo", "orpo", "simpo", "kto"):
        extra = [f"objective={objective}"] + (["data=embedded_preferences"] if objective != "sft" else [])
        for key, value in leaves(compose_recipe(extra)):
            seen.setdefault(key, (value, extra))
    return seen


LEAVES = typed_leaves()


def refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as raised:
        check_overrides(overrides)
        compose_recipe(overrides)
    message = str(raised.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key", sorted(k for k, (v, _) in LEAVES.items() if isinstance(v, (bool, int, float))
                                       and not isinstance(v, str) and k not in FREE_TEXT))
def test_a_number_or_flag_of_the_wrong_type_is_one_line_naming_the_key(key):
    value, extra = LEAVES[key]
    assert key in refused([*extra, f"{key}=banana"])


# Choices checked outside _CHOICES: the model's dense dtype, the objective's loss variant, the NaN policy.
OTHER_CHOICES = ["model.dtype", "objective.loss_type", "trainer.nonfinite"]


@pytest.mark.parametrize("key", sorted(k for k in _CHOICES if k in LEAVES) + OTHER_CHOICES)
def test_a_value_outside_the_choices_is_one_line_naming_the_key(key):
    assert key in refused([*LEAVES.get(key, (None, []))[1], f"{key}=banana"])


def test_unknown_keys_groups_and_unparsable_overrides_are_one_line():
    assert "trainer.max_stepz" in refused(["trainer.max_stepz=3"])
    assert "Could not find 'quantization/int9' Available options in 'quantization'" in refused(["quantization=int9"])
    assert "[1" in refused(["lora.r=[1"])


def test_every_key_is_covered():
    typed = {k for k, (v, _) in LEAVES.items() if isinstance(v, (bool, int, float)) and not isinstance(v, str)}
    uncovered = set(LEAVES) - typed - set(_CHOICES) - set(OTHER_CHOICES) - set(FREE_TEXT) - {"objective.name"}
    # Lists and nulls: skip_modules/target_modules/gptq/... are given the wrong type too.
    for key in sorted(uncovered):
        value, extra = LEAVES[key]
        if value is None or OmegaConf.is_list(value):
            continue
        pytest.fail(f"{key}={value!r}: no bad-value case covers it; add it to FREE_TEXT with the check that does")
