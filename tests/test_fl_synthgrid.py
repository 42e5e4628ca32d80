"""The Wav2Vec2 federated + DP variant through the Hydra entry (training/wav2vec2/) on a tiny corpus.

The corpus is a fixture in the data.manifest format: 6 speakers x 4 short utterances
(speaker-specific harmonic tones, GRID-grammar transcripts) in `train`, 2 speakers in
`test` and `public`; wav2vec2 is pre-trained for 2 steps so the checkpoint path of
the real run is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from data.media import write_wav
from data.manifest import Utterance, write_split
from training.config import PROJECT_ROOT

WORDS = ["BIN BLUE AT F TWO NOW", "LAY RED BY G ONE SOON", "PLACE GREEN IN H SIX AGAIN", "SET WHITE WITH L NINE PLEASE"]
RATE = 16000


def _write_corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    layout = {"train": (6, 4), "test": (2, 2), "public": (2, 2)}
    spk_no = 0
    for split, (n_speakers, per_speaker) in layout.items():
        utterances = []
        for _ in range(n_speakers):
            spk_no += 1
            speaker = f"s{spk_no:02d}"
            pitch = 100 + 25 * spk_no
            for u in range(per_speaker):
                n = RATE // 2 + 800 * u  # 0.5 - 0.65 s: enough frames for CTC over ~20 characters
                t = np.arange(n) / RATE
                wave = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.1 * np.sin(2 * np.pi * 3 * pitch * t) + 0.02 * rng.standard_normal(n)
                path = root / "audio" / speaker / f"{speaker}_u{u}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_wav(path, wave.astype(np.float32), RATE)
                utterances.append(Utterance(f"{speaker}/{speaker}_u{u}", "", str(path), round(n / 640), n, speaker, WORDS[u % len(WORDS)]))
        write_split(root, split, utterances)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("tinygrid"))


def _cfg(corpus: Path, runs: Path, *overrides: str):
    import training.config  # noqa: F401  (resolvers, schemas)

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return compose(
            "config",
            overrides=[
                "experiment=fl_dp",
                f"data.dir={corpus}",
                f"paths.runs_dir={runs}",
                "federated.num_clients=2",
                "federated.num_rounds=1",
                "federated.local_steps=1",
                "federated.backend=sequential",
                "trainer.batch_size=4",
                "pretrain.max_steps=2",
                "pretrain.batch_size=2",
                *overrides,
            ],
        )


REQUIRED_KEYS = ("wer", "cer", "epsilon/max", "rounds", "bytes_per_client_round", "clients", "train_seconds", "rejected", "failed")


def test_fl_local_dp_run_writes_metrics_and_clients_send_only_parameter_updates(corpus, tmp_path, monkeypatch):
    from privacy.federated import runner
    from privacy.federated.synthgrid_task import load_split
    from training.wav2vec2.finetune import run_wav2vec2_task

    captured = {}
    original = runner.InProcessGrid.__init__

    def keep_grid(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured["grid"] = self

    monkeypatch.setattr(runner.InProcessGrid, "__init__", keep_grid)
    cfg = _cfg(corpus, tmp_path / "runs", "dp=local", "dp.target_epsilon=8", "compression=int8")
    metrics = run_wav2vec2_task(cfg)

    checkpoint = Path(cfg.model.checkpoint)
    assert (checkpoint / "config.json").is_file() and json.loads((checkpoint / "status.json").read_text())["status"] == "done"
    written = json.loads((Path(cfg.paths.run_dir) / "federated" / "metrics.json").read_text())
    for key in REQUIRED_KEYS + ("epsilon/client_0", "epsilon/client_1"):
        assert key in written, key
    assert written["rounds"] == 1 and written["clients"] == 2 and written["failed"] == 0 and written["rejected"] == 0
    # private noise (OS CSPRNG), bytes from the wire, no per-round evaluation on the clients' private data
    assert written["not_private"] == 0 and written["dp/noise_from_os_csprng"] == 1 and written["bytes_on_wire"] == 1
    assert written["client_evaluation"] == 0 and written["rounds_not_aggregated"] == 0
    assert 0 < written["epsilon/max"] <= 8.0 + 1e-6
    assert written["epsilon/max"] == max(written["epsilon/client_0"], written["epsilon/client_1"])
    # int8 payload: about a quarter of the dense float32 update
    assert written["bytes_per_client_round"] < 0.3 * written["dense_bytes_per_client_round"]
    assert metrics["wer"] == written["wer"]
    # the same logs as every other stage: one entry per round, then the test result
    from common.files import read_jsonl

    log = read_jsonl(Path(cfg.paths.run_dir) / "federated" / "log.jsonl")
    assert [e["step"] for e in log] == [1, 1] and log[-1]["test/wer"] == written["wer"]
    assert "eval/loss" not in log[0]  # under DP no client evaluates on its private data (federated.client_evaluation=false)
    assert "epsilon/max_client" in log[0] and (Path(cfg.paths.run_dir) / "federated" / "log.csv").read_text().startswith("step,key,value")
    assert read_jsonl(checkpoint / "log.jsonl")[-1]["step"] == 2  # wav2vec2 pretraining logs too

    # what left the clients: only arrays named after trainable parameters, and plain numbers
    grid = captured["grid"]
    replies = [m for m in grid.received if m.metadata.message_type.startswith("train")]
    assert len(replies) == 2
    trainable = {name for name, p in _model(cfg).named_parameters() if p.requires_grad}
    texts = set(load_split(cfg.data.dir, "train")[1])
    n_trainable = sum(p.numel() for p in _model(cfg).parameters() if p.requires_grad)
    for reply in replies:
        content = reply.content
        assert set(content.array_records) == {"arrays"} and set(content.metric_records) == {"metrics"}
        assert not content.config_records
        # int8 updates travel packed: one uint8 array "update::packed" (header, scales, codes; deflated)
        assert set(content["arrays"]) == {"update::packed"}, sorted(content["arrays"])
        packed = content["arrays"]["update::packed"].numpy()
        assert packed.dtype == np.uint8 and packed.ndim == 1
        # no room for audio: the bytes are at most one byte per trainable parameter + scales and header
        assert packed.nbytes < 1.1 * n_trainable
        # and it decodes against the global model into exactly the trainable parameters
        from privacy.federated.compression import decompress

        shapes = {name: tuple(p.shape) for name, p in _model(cfg).named_parameters() if p.requires_grad}
        assert set(decompress({k: a.numpy() for k, a in content["arrays"].items()}, shapes)) == trainable
        # under DP nothing outside the guarantee: no loss, no example count (bytes are measured by the server)
        assert set(content["metrics"]) == {"epsilon", "partition-id"}
        for key, value in content["metrics"].items():
            assert isinstance(value, (int, float)), key
        assert not any(t in json.dumps(dict(content["metrics"].items())) for t in texts)


def _model(cfg):
    from privacy.federated.synthgrid_task import wav2vec2_synthgrid_task
    from training.wav2vec2.run_config import wav2vec2_run_config

    return wav2vec2_synthgrid_task(wav2vec2_run_config(cfg, "/tmp")).build_model()


def test_centralised_baseline_makes_the_federations_steps_on_the_clients_union(corpus, tmp_path):
    from training.wav2vec2.finetune import run_wav2vec2_task

    cfg = _cfg(corpus, tmp_path / "runs", "federated=none", "dp=none", "federated.num_rounds=2", "federated.local_steps=2")
    metrics = run_wav2vec2_task(cfg)
    assert metrics["steps"] == 2 * 2 * 2  # rounds x local steps x clients
    # 24 training utterances, 4 held out per client for federated evaluation
    assert metrics["train_utterances"] == 24 - 2 * 4
    assert metrics["epsilon/max"] == 0.0
    assert 0.0 <= metrics["wer"] and np.isfinite(metrics["test_loss"])
    assert (Path(cfg.paths.run_dir) / "federated" / "metrics.json").is_file()
    from common.files import read_jsonl

    assert read_jsonl(Path(cfg.paths.run_dir) / "federated" / "log.jsonl")[-1]["test/wer"] == metrics["wer"]


def test_startup_errors_name_the_problem_before_any_audio_is_read(corpus, tmp_path, monkeypatch):
    from privacy.dp import DPPlanError
    from privacy.federated import synthgrid_task
    from training.wav2vec2.finetune import run_wav2vec2_task

    def no_audio(*args, **kwargs):
        raise AssertionError("audio was read before the start-up checks failed")

    monkeypatch.setattr(synthgrid_task, "load_split", no_audio)
    runs = tmp_path / "runs"
    with pytest.raises(ValueError, match="num_clients=7 but the train split .* has only 6 speakers"):
        run_wav2vec2_task(_cfg(corpus, runs, "federated.num_clients=7", "dp=none"))
    # 2 clients hold 3 speakers x 4 utterances, minus 4 held out: N = 8 -> delta must be < 1/8
    with pytest.raises(DPPlanError, match=r"delta=0.2 must be < 1/N = 1/8"):
        run_wav2vec2_task(_cfg(corpus, runs, "dp=local", "dp.target_delta=0.2"))
    with pytest.raises(DPPlanError, match="unreachable"):
        run_wav2vec2_task(_cfg(corpus, runs, "dp=local", "dp.target_epsilon=1e-4", "dp.max_noise_multiplier=2"))
    with pytest.raises(DPPlanError, match="must be < 1/N = 1/2"):
        run_wav2vec2_task(_cfg(corpus, runs, "dp=central", "dp.target_delta=0.6"))
    with pytest.raises(DPPlanError, match="dp=central is user-level"):
        run_wav2vec2_task(_cfg(corpus, runs, "dp=central", "federated=none"))
    with pytest.raises(ValueError, match="trains Wav2Vec2 only"):
        run_wav2vec2_task(_cfg(corpus, runs, "model=avhubert_tiny", "dp=local"))
    with pytest.raises(ValueError, match="federated.local_optimizer='adamw': expected one of sgd | adam"):
        run_wav2vec2_task(_cfg(corpus, runs, "federated.local_optimizer=adamw"))
    # data.on_error=skip is not implemented here: refused up front instead of silently ignored
    with pytest.raises(ValueError, match="data.on_error=skip: the Wav2Vec2 variant reads every audio file strictly"):
        run_wav2vec2_task(_cfg(corpus, runs, "data.on_error=skip"))
    # issue 18: DP options that cannot hold, robust aggregators that defend nobody, speaker-level DP without one speaker per client
    with pytest.raises(DPPlanError, match="dp-poisson-sampling"):
        run_wav2vec2_task(_cfg(corpus, runs, "dp=local", "dp.poisson_sampling=false"))
    with pytest.raises(DPPlanError, match="dp-unit.*dp=local"):
        run_wav2vec2_task(_cfg(corpus, runs, "dp=local", "dp.unit=speaker"))
    with pytest.raises(DPPlanError, match="one client per speaker: federated.num_clients=2 but .* has 6 speakers"):
        run_wav2vec2_task(_cfg(corpus, runs, "dp=central", "dp.unit=speaker", "dp.target_delta=1e-3"))
    with pytest.raises(ValueError, match="krum-malicious"):
        run_wav2vec2_task(_cfg(corpus, runs, "dp=none", "federated=krum", "federated.num_clients=5"))
    with pytest.raises(ValueError, match="trims int\\(beta x n\\)"):
        run_wav2vec2_task(_cfg(corpus, runs, "dp=none", "federated=fedtrimmedavg", "federated.num_clients=4"))


def test_speaker_level_dp_is_central_dp_with_one_client_per_speaker(corpus):
    from training.wav2vec2.plan import check_plan

    cfg = _cfg(corpus, Path("/tmp/unused"), "dp=central", "dp.unit=speaker", "federated.num_clients=6", "dp.target_delta=1e-3")
    plan = check_plan(cfg)
    assert plan["dp_unit"] == "speaker" and len(plan["clients"]) == 6
    assert "cdp-eps8.0-spk" in cfg.paths.run_dir  # never shares a directory with a client-level run
    assert check_plan(_cfg(corpus, Path("/tmp/unused"), "dp=central", "dp.target_delta=1e-3"))["dp_unit"] == "client"
    repro = _cfg(corpus, Path("/tmp/unused"), "dp=local", "dp.reproducible_noise_NOT_PRIVATE=true")
    assert "NOTPRIVATE" in repro.paths.run_dir


def test_client_partitions_hold_whole_speakers_and_batches_pad_labels_with_minus_100(corpus):
    from privacy.federated.synthgrid_task import client_indices, load_split, wav2vec2_synthgrid_task

    speakers = load_split(corpus, "train")[0]
    owners: dict[str, set[int]] = {}
    for pid in range(3):
        train_idx, held_idx = client_indices(speakers, pid, 3, seed=1, eval_utterances=4)
        assert not set(train_idx) & set(held_idx)
        for i in train_idx + held_idx:
            owners.setdefault(speakers[i], set()).add(pid)
    assert len(owners) == 6 and all(len(p) == 1 for p in owners.values())  # every speaker on exactly one client

    task = wav2vec2_synthgrid_task({"task-data-dir": str(corpus), "seed": 1, "batch-size": 4})
    train, held = task.build_loaders(0, 3)
    assert len(train.dataset) + len(held.dataset) == 8  # two whole speakers
    batch = next(iter(train))
    assert set(batch) == {"input_values", "attention_mask", "labels"}
    assert batch["input_values"].dtype == torch.float32 and batch["input_values"].dim() == 2
    assert torch.all(batch["input_values"][batch["attention_mask"] == 0] == 0)
    valid = batch["labels"] != -100
    assert torch.all(batch["labels"][valid] >= 1)  # ids > 0 (0 is the CTC blank), padding is -100
    # a row's padding is a suffix
    assert torch.all(valid[:, :-1] | ~valid[:, 1:])
    loss, n = task.loss_fn(task.build_model(), batch)
    assert n == len(batch["labels"]) and torch.isfinite(loss)


def test_split_targets_follow_the_tokenizer_of_each_call(corpus):
    from privacy.federated.synthgrid_task import load_split, make_tokenizer

    chars = load_split(corpus, "train")  # fills the audio cache with the default (char) tokenizer
    word_tokenizer = make_tokenizer("word", corpus)
    words = load_split(corpus, "train", word_tokenizer)
    assert words[2] is chars[2]  # the audio is read once
    for text, char_ids, word_ids in zip(words[1], chars[3], words[3]):
        assert len(word_ids) == len(text.split()) == 6
        assert word_tokenizer.decode(word_ids.tolist()) == text
        assert len(char_ids) == len(text)
