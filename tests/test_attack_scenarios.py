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


# ----------------------------------------------------------------------------- which trials are scored
def test_all_pair_trials_scores_every_pair_once_with_the_right_labels():
    from data.manifest import all_pair_trials

    speakers = ["a"] * 2 + ["b"] * 3 + ["c"] * 4
    ids = [f"u{i}" for i in range(len(speakers))]
    trials = all_pair_trials(ids, speakers)
    assert len(trials) == 9 * 8 // 2
    assert len({frozenset((t.a, t.b)) for t in trials}) == len(trials)  # no pair twice, none in both orders
    assert all(ids.index(t.a) < ids.index(t.b) for t in trials)  # the enrolment is the earlier utterance
    speaker_of = dict(zip(ids, speakers))
    assert all(t.target == (speaker_of[t.a] == speaker_of[t.b]) for t in trials)
    assert sum(t.target for t in trials) == 1 + 3 + 6  # C(2,2) + C(3,2) + C(4,2)


def test_all_pair_trials_cap_keeps_every_target_and_a_seeded_subset_of_non_targets():
    from data.manifest import all_pair_trials

    speakers = [f"s{i // 5}" for i in range(30)]  # 6 speakers x 5 utterances: 60 target, 375 non-target pairs
    ids = [f"u{i}" for i in range(30)]
    full = all_pair_trials(ids, speakers)
    capped = all_pair_trials(ids, speakers, max_nontarget=50, seed=7)
    assert sum(t.target for t in capped) == sum(t.target for t in full) == 60
    assert sum(not t.target for t in capped) == 50 and set(capped) <= set(full)
    assert capped == all_pair_trials(ids, speakers, max_nontarget=50, seed=7)
    assert capped != all_pair_trials(ids, speakers, max_nontarget=50, seed=8)
    assert all_pair_trials(ids, speakers, max_nontarget=10_000) == full  # a cap above the count changes nothing


def test_all_pair_trials_bad_input():
    from data.manifest import all_pair_trials

    with pytest.raises(ValueError, match="3 utterance ids but 2 speakers"):
        all_pair_trials(["x", "y", "z"], ["a", "b"])
    with pytest.raises(ValueError, match="no target pairs"):
        all_pair_trials(["x", "y"], ["a", "b"])
    with pytest.raises(ValueError, match="max_nontarget=0"):
        all_pair_trials(["x", "y", "z"], ["a", "a", "b"], max_nontarget=0)


def test_the_attack_scores_all_pairs_by_default_and_the_trial_list_on_request(tmp_path):
    from data.manifest import read_trials
    from training.attack import FeatureSet, _trials

    speakers = [f"s{i % 4}" for i in range(12)]
    fs = FeatureSet(None, None, speakers, [f"u{i}" for i in range(12)], [3] * 12)
    (tmp_path / "trials.txt").write_text("1 u0 u4\n0 u0 u1\n")
    metrics = {}
    pairs = _trials(cfg_for(tmp_path), tmp_path / "trials.txt", fs, metrics)
    assert len(pairs) == 66 and sum(t.target for t in pairs) == 4 * 3 and metrics["skipped/trials"] == 0
    capped = _trials(cfg_for(tmp_path, "attacker.max_nontarget_trials=5"), tmp_path / "trials.txt", fs, {})
    assert len(capped) == 12 + 5
    listed = _trials(cfg_for(tmp_path, "attacker.trials=list"), tmp_path / "trials.txt", fs, {})
    assert listed == read_trials(tmp_path / "trials.txt")


def test_a_cap_on_a_read_trial_list_fails_at_start_up_naming_both_options(tmp_path):
    from training.startup import check_attack

    with pytest.raises(ValueError, match=r"attacker.max_nontarget_trials=5.*attacker.trials=list"):
        check_attack(cfg_for(tmp_path, "attacker.trials=list", "attacker.max_nontarget_trials=5"))


def test_the_voxceleb_experiment_keeps_the_official_trial_list(tmp_path):
    assert cfg_for(tmp_path, "experiment=voxceleb2_attacker").attacker.trials == "list"
    assert cfg_for(tmp_path, "experiment=privacy_stats").attacker.trials == "all_pairs"


def test_mean_normalising_attacker_removes_utterance_noise_exactly_and_keeps_frame_noise():
    """attacker.normalize=mean: utterance-level additive noise (one draw per utterance) vanishes, so
    the protected sequences equal the normalised clean ones; frame noise does not; mean_std also
    removes a positive per-utterance scale."""
    from privacy.masks import build_masks
    from training.attack import normalize_utterances

    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(t, 6, generator=g) * 3 + 5 for t in (7, 11, 4)]
    utt = build_masks("additive", dim=6, init_scale=2.0, modalities=("audio",), noise_granularity="utterance",
                      generator=torch.Generator().manual_seed(1))
    frame = build_masks("additive", dim=6, init_scale=2.0, modalities=("audio",), noise_granularity="frame",
                        generator=torch.Generator().manual_seed(1))
    utt(clean[0][None], None), frame(clean[0][None], None)  # calibrate the feature scale once
    protected_utt = [utt(x[None], None)[0][0] for x in clean]
    protected_frame = [frame(x[None], None)[0][0] for x in clean]
    reference = normalize_utterances(clean, "mean")
    assert all(torch.allclose(r.mean(0), torch.zeros(6), atol=1e-5) for r in reference)
    assert not torch.allclose(protected_utt[0], clean[0], atol=0.1)  # the noise is there before normalising
    for r, p in zip(reference, normalize_utterances(protected_utt, "mean")):
        torch.testing.assert_close(p, r, atol=1e-4, rtol=0)
    assert not torch.allclose(normalize_utterances(protected_frame, "mean")[1], reference[1], atol=0.1)
    scaled = [x * torch.linspace(0.5, 3.0, 6) + 2.0 for x in clean]
    for r, p in zip(normalize_utterances(clean, "mean_std"), normalize_utterances(scaled, "mean_std")):
        torch.testing.assert_close(p, r, atol=1e-4, rtol=0)
    assert normalize_utterances(clean, "none") is clean and normalize_utterances(None, "mean") is None


def test_sign_canonicalising_attacker_undoes_any_utterance_affine_map_but_not_frame_noise():
    """attacker.normalize=mean_std_sign: for z = m * x + a with (m, a) drawn once per utterance and
    dimension, m of either sign, the transform of z equals the transform of x; the masks' own
    utterance-level draws (both parts) are such maps. Per-frame noise is not undone."""
    from privacy.masks import build_masks
    from training.attack import normalize_utterances

    g = torch.Generator().manual_seed(0)
    # skewed features (exp of a normal), as a real feature dimension usually is
    clean = [torch.randn(t, 8, generator=g).exp() * 2 - 1 for t in (9, 30, 5)]
    maps, scales = [], []
    for x in clean:
        m = torch.randn(8, generator=g) * 2
        m = torch.where(m.abs() < 0.2, torch.full_like(m, -0.5), m)  # keep |m| off 0
        scales.append(m)
        maps.append(x * m + torch.randn(8, generator=g) * 10)
    assert all((m < 0).any() and (m > 0).any() for m in scales)  # both signs in every utterance
    reference = normalize_utterances(clean, "mean_std_sign")
    for r, p in zip(reference, normalize_utterances(maps, "mean_std_sign")):
        torch.testing.assert_close(p, r, atol=1e-4, rtol=0)
    # mean_std alone leaves the sign of m: the negative-m dimensions differ
    assert not all(torch.allclose(p, r, atol=1e-2) for r, p in zip(normalize_utterances(clean, "mean_std"),
                                                                   normalize_utterances(maps, "mean_std")))
    # the real masks: multiplicative then additive, one draw per utterance; some factors are negative at sigma 2
    both = build_masks("both", dim=8, init_scale=2.0, modalities=("audio",), noise_granularity="utterance",
                       generator=torch.Generator().manual_seed(1))
    both(clean[0][None], None)  # calibrate
    protected = [both(x[None], None)[0][0] for x in clean]
    for r, p in zip(reference, normalize_utterances(protected, "mean_std_sign")):
        torch.testing.assert_close(p, r, atol=1e-3, rtol=0)
    frame = build_masks("both", dim=8, init_scale=2.0, modalities=("audio",), noise_granularity="frame",
                        generator=torch.Generator().manual_seed(1))
    frame(clean[0][None], None)
    noisy = normalize_utterances([frame(x[None], None)[0][0] for x in clean], "mean_std_sign")
    assert not torch.allclose(noisy[1], reference[1], atol=0.1)
    # every output is standardised: zero mean, unit std, non-negative skew (or skew within the tolerance)
    for r in reference:
        torch.testing.assert_close(r.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(r.std(0), torch.ones(8), atol=1e-5, rtol=0)
        assert (r.pow(3).mean(0) >= -1e-3).all()


def test_sign_canonicalising_keeps_dimensions_with_zero_skew_and_one_frame_utterances():
    """A symmetric dimension (skew 0) cannot be sign-canonicalised: it keeps its sign; a 1-frame
    utterance has no spread and becomes zeros, as with mean_std."""
    from training.attack import normalize_utterances

    symmetric = torch.tensor([[-1.0, 3.0], [0.0, -1.0], [1.0, -1.0], [0.0, -1.0]])  # dim 0 skew 0, dim 1 skew > 0
    out = normalize_utterances([symmetric, -symmetric], "mean_std_sign")
    assert out[0][0, 0] < 0 and out[1][0, 0] > 0  # skew 0: the sign is kept, so x and -x stay different
    torch.testing.assert_close(out[0][:, 1], out[1][:, 1])  # skewed dimension: same output for x and -x
    assert torch.equal(normalize_utterances([torch.ones(1, 2) * 7], "mean_std_sign")[0], torch.zeros(1, 2))


def test_segment_mean_attacker_removes_segment_noise_on_the_masks_grid_only():
    """attacker.normalize=segment_mean with the masks' segment length removes segment-level additive
    noise exactly (each segment, the last one shorter, minus its own mean); on another grid it does not."""
    from privacy.masks import build_masks
    from training.attack import normalize_utterances

    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(t, 6, generator=g) * 3 + 5 for t in (23, 10, 7, 1)]
    seg = build_masks("additive", dim=6, init_scale=2.0, modalities=("audio",), noise_granularity="segment",
                      segment_frames=5, generator=torch.Generator().manual_seed(1))
    seg(clean[0][None], None)
    protected = [seg(x[None], None)[0][0] for x in clean]
    assert not torch.allclose(normalize_utterances(protected, "mean")[0], normalize_utterances(clean, "mean")[0], atol=0.1)
    reference = normalize_utterances(clean, "segment_mean", 5)
    for r, p in zip(reference, normalize_utterances(protected, "segment_mean", 5)):
        torch.testing.assert_close(p, r, atol=1e-4, rtol=0)
    torch.testing.assert_close(reference[0][20:], clean[0][20:] - clean[0][20:].mean(0))  # the short last segment
    torch.testing.assert_close(reference[0][5:10], clean[0][5:10] - clean[0][5:10].mean(0))
    assert torch.equal(reference[3], torch.zeros(1, 6))
    off_grid = normalize_utterances(protected, "segment_mean", 4)
    assert not torch.allclose(off_grid[0], normalize_utterances(clean, "segment_mean", 4)[0], atol=0.1)
    with pytest.raises(ValueError, match=r"segment_mean needs the segment length masks.segment_frames >= 1, got None"):
        normalize_utterances(clean, "segment_mean")


def test_normalising_attacker_has_its_own_stage_and_rejects_raw_input(tmp_path):
    from training.startup import check_attack

    fake_export(tmp_path)
    cfg = cfg_for(tmp_path, "attacker.scenario=semi_informed", "attacker.normalize=mean")
    assert attack_stage_name(cfg) == "attack/semi_informed-mean"
    assert attack_stage_name(cfg_for(tmp_path, "attacker.input=clean", "attacker.normalize=mean_std")) == "attack/clean-mean_std"
    assert attack_stage_name(cfg_for(tmp_path, "attacker.scenario=semi_informed", "attacker.normalize=mean_std_sign")) \
        == "attack/semi_informed-mean_std_sign"
    assert attack_stage_name(cfg_for(tmp_path, "attacker.scenario=semi_informed", "attacker.normalize=segment_mean",
                                     "masks.segment_frames=10")) == "attack/semi_informed-segment_mean"
    with pytest.raises(ValueError, match=r"attacker.normalize=segment_mean .* masks.segment_frames=0: expected an integer >= 1"):
        attack_stage_name(cfg_for(tmp_path, "attacker.normalize=segment_mean", "masks.segment_frames=0"))
    train_set, _, test_set, _ = load_feature_sets(cfg)
    assert float(train_set.audio[0].abs().max()) == 0.0  # the fake export is constant per utterance: nothing is left
    with pytest.raises(ValueError, match=r"attacker.normalize=mean conflicts with attacker.input=raw"):
        check_attack(cfg_for(tmp_path, "attacker.input=raw", "attacker.normalize=mean"))
