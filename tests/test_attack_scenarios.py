"""Each VoicePrivacy attack scenario feeds the right representation to the attacker's training,
enrolment and trials (training/attack.py reading an export written in the format of
training/avhubert/export.py)."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

import training.config  # noqa: F401
from training.attack import SCENARIOS, attack_stage_name, load_feature_sets, scenario_kinds
from training.avhubert.export import EXPORT_KINDS
from training.config import PROJECT_ROOT

# each kind is a constant, so a set's values say which kind it holds
VALUE = {kind: float(i + 1) for i, kind in enumerate(EXPORT_KINDS)}
FRAMES, DIM = 3, 4


def fake_export(run_dir, kinds=EXPORT_KINDS):
    export = run_dir / "export"
    export.mkdir(parents=True)
    for split, n in (("attacker_train", 4), ("attacker_trials", 2)):
        tensors = {f"{m}/{k}": torch.full((n * FRAMES, DIM), VALUE[k] * (1 if m == "audio" else -1), dtype=torch.float16)
                   for m in ("audio", "video") for k in kinds}
        tensors["offsets"] = torch.arange(0, (n + 1) * FRAMES, FRAMES, dtype=torch.int64)
        save_file(tensors, str(export / f"{split}.safetensors"))
        (export / f"{split}.json").write_text(json.dumps({"ids": [f"{split}{i}" for i in range(n)],
                                                          "speakers": [f"s{i % 2}" for i in range(n)], "dim": DIM}))


def cfg_for(run_dir, *overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return compose("config", overrides=[f"paths.run_dir={run_dir}", *overrides])


def kind_of(feature_set):
    value = float(feature_set.audio[0][0, 0])
    assert float(feature_set.video[0][0, 0]) == -value
    return {v: k for k, v in VALUE.items()}[value]


@pytest.mark.parametrize("scenario, expected", [
    ("ignorant", ("clean", "clean", "protected")),
    ("lazy_informed", ("clean", "protected_enrol", "protected")),
    ("semi_informed", ("protected", "protected", "protected")),
    ("untrained_masks", ("untrained", "protected", "protected")),
])
def test_each_scenario_feeds_training_enrolment_and_trials(tmp_path, scenario, expected):
    fake_export(tmp_path)
    cfg = cfg_for(tmp_path, "attacker.input=protected", f"attacker.scenario={scenario}")
    train_set, enrol_set, test_set, dim = load_feature_sets(cfg)
    assert (kind_of(train_set), kind_of(enrol_set), kind_of(test_set)) == expected
    assert dim == DIM and train_set.ids[0].startswith("attacker_train") and enrol_set.ids == test_set.ids
    assert attack_stage_name(cfg) == f"attack/{scenario}"


def test_clean_input_is_clean_everywhere(tmp_path):
    fake_export(tmp_path)
    train_set, enrol_set, test_set, _ = load_feature_sets(cfg_for(tmp_path, "attacker.input=clean"))
    assert {kind_of(train_set), kind_of(enrol_set), kind_of(test_set)} == {"clean"}


def test_the_three_voiceprivacy_scenarios_and_the_extra_variant_are_all_there_is():
    assert set(SCENARIOS) == {"ignorant", "lazy_informed", "semi_informed", "untrained_masks"}
    # VoicePrivacy: only the semi-informed attacker trains on protected data; only ignorant enrols clean
    assert [k for k, (train, _, _) in SCENARIOS.items() if train == "protected"] == ["semi_informed"]
    assert all(test == "protected" for _, _, test in SCENARIOS.values())
    with pytest.raises(ValueError, match="attacker.scenario='informed'"):
        scenario_kinds("protected", "informed")


def test_an_export_from_before_the_scenarios_is_a_clear_error(tmp_path):
    fake_export(tmp_path, kinds=("clean", "protected"))
    with pytest.raises(ValueError, match=r"no 'protected_enrol' features .*attacker.scenario=lazy_informed.*task=export force=true"):
        load_feature_sets(cfg_for(tmp_path, "attacker.scenario=lazy_informed"))
