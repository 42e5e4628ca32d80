"""A federation stopped after round r continues from its server checkpoint as if it had never stopped.

Without DP, or with reproducible (NOT private) noise, the resumed run equals an uninterrupted one bit for bit:
global model, per-round log, the clients' state (top-k residuals, local-DP accountants) and the accountant's
releases. With noise from the OS CSPRNG the noise differs but the accounting continues (epsilon over the whole run).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.files import read_jsonl
from privacy.federated.runner import run_federated
from privacy.federated.server_checkpoint import (SERVER_CHECKPOINT, CheckpointMismatch, check_resumable, read_checkpoint,
                                                 write_checkpoint)
from privacy.federated.settings import resolve_run_config

TINY = {"task": "privacy.federated.task:tiny_synthetic_task", "num-rounds": 4, "lr": 0.1, "seed": 3}


class Stop(Exception):
    """Raised by the round callback: the process "dies" after a round's log and checkpoint are written."""


def _interrupted_then_resumed(cfg: dict, num_clients: int, run_dir: Path, stop_after: int) -> tuple[dict, list]:
    """Run `cfg` in `run_dir`, stop it after round `stop_after`, run it again; the second run's summary and
    the entries the round callback saw in the second run (replayed ones first)."""
    cfg = {**cfg, "run-dir": str(run_dir)}

    def stop(entry):
        if entry["server_round"] == stop_after:
            raise Stop

    with pytest.raises(Stop):
        run_federated(cfg, num_clients, backend="sequential", on_round=stop)
    assert read_checkpoint(run_dir / SERVER_CHECKPOINT)["server_round"] == stop_after
    seen: list = []
    return run_federated(cfg, num_clients, backend="sequential", on_round=seen.append), seen


def _comparable(rounds: list) -> str:
    return json.dumps(rounds, sort_keys=True, default=float)


CASES = {
    # Flower's fixed cohorts (Python's random) and FedAvg; top-k residuals live in the clients' context.state
    "fedavg-topk-error-feedback": ({**TINY, "compression": "topk", "topk-fraction": 0.2, "fraction-train": 0.67}, 3),
    # Flower's FedAdam keeps its moments between rounds; an EMA of the global models
    "flower-fedadam-ema": ({**TINY, "strategy": "fedadam", "server-lr": 0.05, "ema": 0.5}, 2),
    # Poisson cohorts, server Adam with DP-AdamBC under central DP, noise reproducible from the seed (NOT private)
    "poisson-adam-bc-central-dp": ({**TINY, "cohort-sampling": "poisson", "cohort-rate": 0.5, "strategy": "fedadam",
                                    "server-lr": 0.01, "server-adam-bc": 0.3, "dp": "central", "target-epsilon": 8.0,
                                    "target-delta": 1e-3, "dp-reproducible-noise-NOT-PRIVATE": True,
                                    "local-steps": 2}, 6),
    # Poisson cohorts, FedAvgM, linear lr decay, no DP
    "poisson-fedavgm": ({**TINY, "cohort-sampling": "poisson", "cohort-rate": 0.5, "server-momentum": 0.9,
                         "fedavg-server-lr": 0.5, "lr-decay": "linear"}, 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resumed_federation_equals_an_uninterrupted_one(case, tmp_path):
    cfg, clients = CASES[case]
    seen_whole: list = []
    whole = run_federated({**cfg, "run-dir": str(tmp_path / "whole")}, clients, backend="sequential", on_round=seen_whole.append)
    resumed, seen = _interrupted_then_resumed(cfg, clients, tmp_path / "resumed", stop_after=2)

    assert resumed["rounds_completed"] == whole["rounds_completed"] == 4
    assert resumed["resumed_after_round"] == [2] and "resumed_after_round" not in whole
    for name in whole["final_state"]:
        np.testing.assert_array_equal(resumed["final_state"][name], whole["final_state"][name])
    assert _comparable(resumed["rounds"]) == _comparable(whole["rounds"])
    assert _comparable(seen) == _comparable(seen_whole)  # the caller's log, rebuilt: rounds 1-2 replayed, then 3-4
    assert resumed["stop_reason"] == whole["stop_reason"] == "completed"
    assert resumed.get("central_epsilon") == whole.get("central_epsilon")
    written = json.loads((tmp_path / "resumed" / "federated_rounds.json").read_text())
    assert [r["server_round"] for r in written["rounds"]] == [1, 2, 3, 4]


def test_central_dp_with_secure_noise_keeps_accounting_over_the_whole_run(tmp_path):
    """Fresh noise after the resumption, but the accountant continues: 4 releases, the uninterrupted run's epsilon."""
    cfg = {**CASES["poisson-adam-bc-central-dp"][0], "dp-reproducible-noise-NOT-PRIVATE": False}
    whole = run_federated({**cfg, "run-dir": str(tmp_path / "whole")}, 6, backend="sequential")
    resumed, _ = _interrupted_then_resumed(cfg, 6, tmp_path / "resumed", stop_after=2)
    assert resumed["central_releases"] == whole["central_releases"] == 4
    assert resumed["central_epsilon"] == pytest.approx(whole["central_epsilon"], rel=1e-12)
    assert [r["central_epsilon"] for r in resumed["rounds"]] == pytest.approx([r["central_epsilon"] for r in whole["rounds"]])


def test_flower_central_dp_accountant_and_local_dp_client_accountants_are_restored(tmp_path):
    pytest.importorskip("opacus")
    central = {**TINY, "dp": "central", "noise-multiplier": 1.0, "clipping-norm": 0.5, "target-epsilon": 1e6, "target-delta": 1e-3}
    whole = run_federated({**central, "run-dir": str(tmp_path / "c_whole")}, 2, backend="sequential")
    resumed, _ = _interrupted_then_resumed(central, 2, tmp_path / "c_resumed", stop_after=3)
    assert resumed["central_epsilon"] == pytest.approx(whole["central_epsilon"], rel=1e-12)  # 4 releases, not 1

    local = {**TINY, "dp": "local", "target-epsilon": 50.0, "target-delta": 1e-3, "local-steps": 2}
    whole = run_federated({**local, "run-dir": str(tmp_path / "l_whole")}, 2, backend="sequential")
    resumed, _ = _interrupted_then_resumed(local, 2, tmp_path / "l_resumed", stop_after=2)
    eps = lambda summary: [c["epsilon"] for r in summary["rounds"] for c in r["clients"]]  # noqa: E731
    assert eps(resumed) == pytest.approx(eps(whole), rel=1e-12)  # round 3's epsilon builds on rounds 1-2's, not on 0
    assert eps(resumed)[-1] > eps(resumed)[2] > eps(resumed)[0] > 0


def test_a_finished_federation_run_again_returns_its_result_without_training(tmp_path):
    cfg = {**TINY, "run-dir": str(tmp_path)}
    first = run_federated(cfg, 2, backend="sequential")
    trained: list = []
    again = run_federated(cfg, 2, backend="sequential", client_app=lambda node: trained.append(node))
    assert trained == []  # no client was asked to train
    for name in first["final_state"]:
        np.testing.assert_array_equal(again["final_state"][name], first["final_state"][name])
    assert _comparable(again["rounds"]) == _comparable(first["rounds"])


def test_resume_is_refused_with_the_reason(tmp_path):
    with pytest.raises(Stop):
        run_federated({**TINY, "run-dir": str(tmp_path)}, 2, backend="sequential",
                      on_round=lambda e: (_ for _ in ()).throw(Stop) if e["server_round"] == 2 else None)
    # another configuration: the differing key, old and new value
    with pytest.raises(CheckpointMismatch, match=r"lr: 0\.1 -> 0\.2"):
        run_federated({**TINY, "lr": 0.2, "run-dir": str(tmp_path)}, 2, backend="sequential")
    # operational settings may change
    assert run_federated({**TINY, "round-timeout": 60.0, "run-dir": str(tmp_path)}, 2, backend="sequential")["rounds_completed"] == 4
    # resume off while a checkpoint is there
    with pytest.raises(CheckpointMismatch, match="resume is off"):
        run_federated({**TINY, "resume": False, "run-dir": str(tmp_path)}, 2, backend="sequential")


def test_dp_rounds_released_after_the_last_checkpoint_block_the_resumption(tmp_path):
    """checkpoint-every=2, stopped after round 3: round 3's model was released under DP, the checkpoint is round 2's."""
    cfg = {**TINY, "dp": "central", "noise-multiplier": 1.0, "target-epsilon": 1e6, "target-delta": 1e-3,
           "checkpoint-every": 2, "run-dir": str(tmp_path)}
    with pytest.raises(Stop):
        run_federated(cfg, 2, backend="sequential", on_round=lambda e: (_ for _ in ()).throw(Stop) if e["server_round"] == 3 else None)
    with pytest.raises(CheckpointMismatch, match=r"also ran round\(s\) \[3\]"):
        run_federated(cfg, 2, backend="sequential")
    # without DP those rounds are simply run again
    plain = {**TINY, "checkpoint-every": 2, "run-dir": str(tmp_path / "plain")}
    with pytest.raises(Stop):
        run_federated(plain, 2, backend="sequential", on_round=lambda e: (_ for _ in ()).throw(Stop) if e["server_round"] == 3 else None)
    whole = run_federated({**plain, "run-dir": str(tmp_path / "plain_whole")}, 2, backend="sequential")
    resumed = run_federated(plain, 2, backend="sequential")
    assert resumed["resumed_after_round"] == [2]
    for name in whole["final_state"]:
        np.testing.assert_array_equal(resumed["final_state"][name], whole["final_state"][name])


def test_clients_state_outside_this_process_blocks_the_resumption():
    """Under Ray or a deployment the clients' context.state is not in the checkpoint (client_states None)."""
    cfg = resolve_run_config({**TINY, "compression": "topk"})
    saved = {"config": dict(cfg), "client_states": None}
    with pytest.raises(CheckpointMismatch, match="top-k error-feedback residuals.*federated.backend=sequential"):
        check_resumable(Path("server_checkpoint.npz"), saved, cfg, grid=object())
    stateless = resolve_run_config({**TINY, "compression": "int8"})
    check_resumable(Path("server_checkpoint.npz"), {"config": dict(stateless), "client_states": None}, stateless, grid=object())


def test_checkpoint_file_round_trips_nested_state_without_pickle(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": {1: [np.zeros(2), None, "x"], "k": 2.5}, "t": (1, True)}
    write_checkpoint(tmp_path / "c.npz", state)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as data:  # nothing in the file needs unpickling
        assert all(data[k].dtype != object for k in data.files)
    back = read_checkpoint(tmp_path / "c.npz")
    np.testing.assert_array_equal(back["a"], state["a"])
    assert back["a"].dtype == np.float32
    assert back["n"]["k"] == 2.5 and back["n"][1][1:] == [None, "x"] and back["t"] == [1, True]
    np.testing.assert_array_equal(back["n"][1][0], np.zeros(2))
    with pytest.raises(TypeError, match=r"state\.f is a function"):
        write_checkpoint(tmp_path / "bad.npz", {"f": lambda: 0})


def test_an_interrupted_hydra_federated_stage_resumes_and_force_starts_over(tmp_path, monkeypatch):
    """train_avhubert.py's federated stage: Ctrl-C after round 2 of 3, the same command again continues after round 2;
    metrics and log.csv equal an uninterrupted run's; force=true deletes the checkpoint and starts from round 1."""
    import training.wav2vec2.finetune as finetune
    from tests.test_fl_synthgrid import _cfg, _write_corpus
    from training.stage import stage_status

    corpus = _write_corpus(tmp_path / "corpus")
    overrides = ("dp=none", "federated.num_rounds=3")
    whole = finetune.run_wav2vec2_task(_cfg(corpus, tmp_path / "whole", *overrides))

    cfg = _cfg(corpus, tmp_path / "runs", *overrides)
    stage_dir = Path(cfg.paths.run_dir) / "federated"
    log_round = finetune.log_round

    def interrupt_after_round_2(logger, entry):
        log_round(logger, entry)
        if entry["server_round"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "log_round", interrupt_after_round_2)
    with pytest.raises(KeyboardInterrupt):
        finetune.run_wav2vec2_task(cfg)
    assert stage_status(stage_dir)["status"] == "interrupted"
    monkeypatch.setattr(finetune, "log_round", log_round)
    resumed = finetune.run_wav2vec2_task(cfg)

    rounds = json.loads((stage_dir / "federated_rounds.json").read_text())
    assert rounds["resumed_after_round"] == [2]
    for key in ("wer", "cer", "test_loss", "rounds", "client_updates", "bytes_per_client_round"):
        assert resumed[key] == whole[key], key
    whole_dir = Path(_cfg(corpus, tmp_path / "whole", *overrides).paths.run_dir) / "federated"
    assert (stage_dir / "log.csv").read_text() == (whole_dir / "log.csv").read_text()

    again = finetune.run_wav2vec2_task(_cfg(corpus, tmp_path / "runs", *overrides, "force=true"))
    assert "resumed_after_round" not in json.loads((stage_dir / "federated_rounds.json").read_text())
    assert again["wer"] == whole["wer"]


def _mlp_and_loader(seed: int):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = torch.Generator().manual_seed(0)  # the same data every time; the model and the shuffling from `seed`
    x, y = torch.randn(40, 6, generator=data), torch.randint(0, 3, (40,), generator=data)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))

    def loss_fn(m, batch):
        inputs, labels = batch
        return torch.nn.functional.cross_entropy(m(inputs), labels), len(labels)

    return model, loader, loss_fn


def test_local_training_resumed_from_its_state_equals_an_uninterrupted_run():
    """train_local (the centralised baseline's loop): state after step 7 of 17 (mid-epoch, 5 batches per epoch),
    reloaded into a fresh model and loader, continues to the same parameters, loss and EMA; dropout, shuffling
    across epochs, Adam's moments and the linear lr decay included."""
    from privacy.federated.task import train_local

    kwargs = dict(steps=17, lr=0.05, optimizer="adam", lr_decay="linear", ema=0.6)
    model, loader, loss_fn = _mlp_and_loader(0)
    states = []
    whole = train_local(model, loader, loss_fn, checkpoint_every=7, on_checkpoint=states.append, **kwargs)
    assert [s["done"] for s in states] == [7, 14]

    model_b, loader_b, _ = _mlp_and_loader(1)  # another start: everything that matters comes from the state
    import torch

    torch.manual_seed(123)
    resumed = train_local(model_b, loader_b, loss_fn, resume_from=_through_file(states[0]), **kwargs)
    assert resumed == whole
    for (name, a), b in zip(model.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="generator"):
        from torch.utils.data import DataLoader

        train_local(model, DataLoader(loader.dataset, batch_size=8), loss_fn, steps=2, checkpoint_every=1, on_checkpoint=print)


def _tiny_dp_run(steps: int, **train_kwargs):
    """Client 0 of the tiny task (2 clients), trained with DP-SGD (Opacus, noise from the OS CSPRNG) for `steps` steps;
    returns (stats, session, model)."""
    import torch

    from privacy.federated.local_dp import LocalDPSession
    from privacy.federated.task import tiny_synthetic_task, train_local

    cfg = resolve_run_config({**TINY, "dp": "local", "target-epsilon": 4.0, "target-delta": 1e-3, "num-rounds": 1,
                              "local-steps": steps, "batch-size": 4})
    task = tiny_synthetic_task(cfg)
    model = task.build_model()
    loader, _ = task.build_loaders(0, 2)
    session = LocalDPSession.from_run_config(cfg, len(loader.dataset), None)
    stats = train_local(model, loader, task.loss_fn, steps=steps, lr=0.1, optimizer="adam", dp=session, **train_kwargs)
    return stats, session, model


def _through_file(state):
    """`state` written and read back as the run directory keeps it (npz + JSON, no pickle)."""
    import tempfile

    from privacy.federated.server_checkpoint import write_checkpoint

    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(Path(d) / "c.npz", state)
        return read_checkpoint(Path(d) / "c.npz")


def test_dp_sgd_resumed_from_its_state_continues_the_privacy_ledger():
    """Under DP-SGD train_local's state holds the ledger: a run resumed after step 7 of 17 ends with the ledger, the
    epsilon and the step count of an uninterrupted run (the noise and batches are new, from the CSPRNG), and starts
    from the checkpoint's parameters and Adam moments; states with and without a ledger are not mixed up."""
    pytest.importorskip("opacus")
    from privacy.federated.local_dp import LocalDPSession

    states: list = []
    whole, whole_session, _ = _tiny_dp_run(17, checkpoint_every=7, on_checkpoint=states.append)
    assert [s["done"] for s in states] == [7, 14]
    assert [LocalDPSession.from_run_config(resolve_run_config({**TINY, "dp": "local"}), 1, s["dp_ledger"]).accountant.steps
            for s in states] == [7, 14]
    assert states[0]["epoch_generator"] is None  # no loader position under DP

    resumed, session, _ = _tiny_dp_run(17, resume_from=_through_file(states[0]))
    assert resumed["steps"] == whole["steps"] == 17
    assert session.accountant.history == whole_session.accountant.history  # one (sigma, q, 17) entry
    assert session.epsilon(1e-3) == whole_session.epsilon(1e-3) <= 4.0 * 1.001
    assert session.noise_multiplier == whole_session.noise_multiplier

    # nothing left to do: the model is the checkpoint's (the parameters were restored, not retrained)
    _, at_checkpoint, model = _tiny_dp_run(7, resume_from=_through_file(states[0]))
    assert at_checkpoint.accountant.steps == 7
    trained = {name: p.detach().numpy() for name, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == states[0]["params"].keys()
    assert all(np.array_equal(trained[k], states[0]["params"][k]) for k in trained)

    import torch

    from privacy.federated.task import tiny_synthetic_task, train_local

    task = tiny_synthetic_task(resolve_run_config(TINY))
    plain = task.build_model()
    loader, _ = task.build_loaders(0, 2)
    with pytest.raises(ValueError, match="privacy ledger"):  # a DP state continued without DP
        train_local(plain, loader, task.loss_fn, steps=17, lr=0.1, optimizer="adam", resume_from=states[0])
    without_dp: list = []
    train_local(plain, loader, task.loss_fn, steps=3, lr=0.1, optimizer="adam", checkpoint_every=3, on_checkpoint=without_dp.append)
    with pytest.raises(ValueError, match="no privacy ledger"):  # a non-DP state continued under DP
        _tiny_dp_run(17, resume_from=without_dp[0])
    forged = dict(states[0], done=8)
    with pytest.raises(ValueError, match="ledger counts 7 steps"):
        _tiny_dp_run(17, resume_from=forged)


def _interrupted_hydra_centralised_run(tmp_path, monkeypatch, *dp_overrides: str) -> dict:
    """A federated=none run (24 steps over a 4-batch union: six epochs; checkpoints every 5 steps, rounded up to
    whole log windows of 2, so every 6) uninterrupted, and the same run Ctrl-C'd at step 14 and started again with
    the same command. Returns both runs' metrics and stage directories and the interrupted attempt's checkpoint
    (asserted to be after step 12)."""
    import training.wav2vec2.finetune as finetune
    from tests.test_fl_synthgrid import _cfg, _write_corpus

    corpus = _write_corpus(tmp_path / "corpus")
    overrides = ("federated=none", *dp_overrides, "federated.num_rounds=3", "federated.local_steps=4",
                 "trainer.log_every=2", "trainer.ckpt_every=5")
    whole_cfg = _cfg(corpus, tmp_path / "whole", *overrides)
    whole = finetune.run_wav2vec2_task(whole_cfg)
    assert whole["steps"] == 24
    cfg = _cfg(corpus, tmp_path / "runs", *overrides)
    stage_dir = Path(cfg.paths.run_dir) / "federated"
    step_log = finetune._step_log

    def dies_at_step_14(logger, total, every, initial=0):
        inner = step_log(logger, total, every, initial)

        def on_step(done, loss, examples):
            inner(done, loss, examples)
            if done == 14:
                raise KeyboardInterrupt

        return on_step

    monkeypatch.setattr(finetune, "_step_log", dies_at_step_14)
    with pytest.raises(KeyboardInterrupt):
        finetune.run_wav2vec2_task(cfg)
    checkpoint = read_checkpoint(stage_dir / finetune.CENTRALISED_CHECKPOINT)
    assert checkpoint["done"] == 12
    monkeypatch.setattr(finetune, "_step_log", step_log)
    resumed = finetune.run_wav2vec2_task(cfg)
    return {"whole": whole, "resumed": resumed, "checkpoint": checkpoint, "stage_dir": stage_dir,
            "whole_dir": Path(whole_cfg.paths.run_dir) / "federated"}


def test_an_interrupted_hydra_dp_sgd_centralised_run_resumes_with_its_ledger(tmp_path, monkeypatch):
    """federated=none dp=local (DP-SGD on the union): stopped at step 14 with checkpoints every 6, the same command
    continues after step 12 and ends with the epsilon, noise multiplier, step count and log length of an
    uninterrupted run; the checkpoint holds the ledger of its 12 steps."""
    pytest.importorskip("opacus")
    from privacy.dp import ClientPrivacyAccountant

    run = _interrupted_hydra_centralised_run(tmp_path, monkeypatch, "dp=local", "dp.target_epsilon=8")
    assert ClientPrivacyAccountant.from_state(json.loads(run["checkpoint"]["dp_ledger"])).steps == 12
    for key in ("steps", "epsilon/max", "noise_multiplier"):
        assert run["resumed"][key] == run["whole"][key], key
    assert run["resumed"]["epsilon/max"] <= 8.0 * 1.001
    assert len((run["stage_dir"] / "log.csv").read_text().splitlines()) == len((run["whole_dir"] / "log.csv").read_text().splitlines())


def test_an_interrupted_hydra_centralised_baseline_resumes_exactly(tmp_path, monkeypatch):
    """federated=none (24 steps over a 4-batch union: six epochs), checkpoints every 6 steps, Ctrl-C at step 14:
    the same command continues after step 12 to the uninterrupted run's model, metrics and log."""
    run = _interrupted_hydra_centralised_run(tmp_path, monkeypatch, "dp=none")
    for key in ("wer", "cer", "test_loss", "train_loss", "steps"):
        assert run["resumed"][key] == run["whole"][key], key
    assert (run["stage_dir"] / "log.csv").read_text() == (run["whole_dir"] / "log.csv").read_text()
    a, b = np.load(run["stage_dir"] / "global_model.npz"), np.load(run["whole_dir"] / "global_model.npz")
    assert all(np.array_equal(a[k], b[k]) for k in b.files)


def test_the_round_log_grows_by_a_line_per_round_and_the_summary_is_written_at_the_end(tmp_path):
    """Each round appends its entry to federated_rounds.jsonl; federated_rounds.json/.csv are written once, at the
    end (rewriting them every round cost time and disk in the square of the rounds)."""
    log_path, summary_path = tmp_path / "federated_rounds.jsonl", tmp_path / "federated_rounds.json"
    during: list = []
    result = run_federated({**TINY, "run-dir": str(tmp_path)}, 2, backend="sequential",
                           on_round=lambda e: during.append((e["server_round"], len(log_path.read_bytes().splitlines()),
                                                              summary_path.exists())))
    assert during == [(1, 1, False), (2, 2, False), (3, 3, False), (4, 4, False)]
    assert read_jsonl(log_path) == json.loads(summary_path.read_text())["rounds"]
    assert _comparable(json.loads(summary_path.read_text())["rounds"]) == _comparable(result["rounds"])
    assert len((tmp_path / "federated_rounds.csv").read_text().splitlines()) == 1 + 4 * 2  # header + client rows


def test_a_cut_off_last_line_of_the_round_log_is_not_a_round(tmp_path):
    """A crash in the middle of an append leaves a last line without its newline: dropped on resumption, as a round
    that was never logged; a damaged line before it is an error naming the file and line."""
    cfg = {**TINY, "checkpoint-every": 2}
    whole = run_federated({**cfg, "run-dir": str(tmp_path / "whole")}, 2, backend="sequential")
    run_dir = tmp_path / "cut"
    with pytest.raises(Stop):
        run_federated({**cfg, "run-dir": str(run_dir)}, 2, backend="sequential",
                      on_round=lambda e: (_ for _ in ()).throw(Stop) if e["server_round"] == 2 else None)
    with open(run_dir / "federated_rounds.jsonl", "ab") as f:
        f.write(b'{"server_round": 3, "clie')  # round 3's append, cut off
    resumed = run_federated({**cfg, "run-dir": str(run_dir)}, 2, backend="sequential")
    assert resumed["resumed_after_round"] == [2]
    for name in whole["final_state"]:
        np.testing.assert_array_equal(resumed["final_state"][name], whole["final_state"][name])
    assert [e["server_round"] for e in read_jsonl(run_dir / "federated_rounds.jsonl")] == [1, 2, 3, 4]

    lines = (run_dir / "federated_rounds.jsonl").read_bytes().splitlines(keepends=True)
    (run_dir / "federated_rounds.jsonl").write_bytes(lines[0] + b"{damaged\n" + b"".join(lines[2:]))
    with pytest.raises(ValueError, match=r"federated_rounds\.jsonl, line 2: not a JSON record"):
        read_jsonl(run_dir / "federated_rounds.jsonl")


def test_a_checkpoint_from_before_the_appended_log_resumes_from_the_rewritten_summary(tmp_path):
    """Runs started before the round log was appended rewrote federated_rounds.json every round and have no .jsonl:
    their checkpoint resumes from that file, and the resumptions it lists are kept."""
    case, clients = CASES["poisson-fedavgm"]
    whole = run_federated({**case, "run-dir": str(tmp_path / "whole")}, clients, backend="sequential")
    run_dir = tmp_path / "old"
    with pytest.raises(Stop):
        run_federated({**case, "run-dir": str(run_dir)}, clients, backend="sequential",
                      on_round=lambda e: (_ for _ in ()).throw(Stop) if e["server_round"] == 2 else None)
    rounds = read_jsonl(run_dir / "federated_rounds.jsonl")
    (run_dir / "federated_rounds.jsonl").unlink()  # what such a run left: the summary as of its last round
    (run_dir / "federated_rounds.json").write_text(json.dumps({"rounds": rounds, "resumed_after_round": [1]}))
    summary_on_disk: dict = {}  # while rounds 3-4 run, the old attempt's summary is gone (its rounds are in the .jsonl)
    resumed = run_federated({**case, "run-dir": str(run_dir)}, clients, backend="sequential",
                            on_round=lambda e: summary_on_disk.setdefault(e["server_round"], (run_dir / "federated_rounds.json").exists()))
    assert summary_on_disk == {1: True, 2: True, 3: False, 4: False}  # 1-2: replayed while the checkpoint is read
    assert resumed["resumed_after_round"] == [1, 2]
    for name in whole["final_state"]:
        np.testing.assert_array_equal(resumed["final_state"][name], whole["final_state"][name])
    assert _comparable(resumed["rounds"]) == _comparable(whole["rounds"])


def test_a_run_resumed_twice_lists_both_resumptions(tmp_path):
    """The summary is written at the end, so the rounds a run was resumed after travel in its checkpoint."""
    cfg = {**TINY, "run-dir": str(tmp_path)}
    for stop_after in (1, 3):
        with pytest.raises(Stop):
            run_federated(cfg, 2, backend="sequential",
                          on_round=lambda e, r=stop_after: (_ for _ in ()).throw(Stop) if e["server_round"] == r else None)
    resumed = run_federated(cfg, 2, backend="sequential")
    assert resumed["resumed_after_round"] == [1, 3]
    assert json.loads((tmp_path / "federated_rounds.json").read_text())["resumed_after_round"] == [1, 3]


def _start_and_corpus(root: Path, manifest: str = "s1/u1\ts1/u1.wav\n") -> tuple[Path, Path]:
    start, corpus = root / "checkpoints" / "start.pt", root / "datasets" / "corpus"
    start.parent.mkdir(parents=True)
    start.write_bytes(b"public start weights")
    (corpus / "manifests").mkdir(parents=True)
    (corpus / "manifests" / "train.tsv").write_text(manifest)
    (corpus / "checksums.sha256").write_text("0123  audio/s1/u1.wav\n")
    return start, corpus


def test_a_moved_project_resumes_when_its_files_are_the_same_and_is_refused_when_they_differ(tmp_path):
    """The run config names the public start and the corpus by path; the checkpoint keeps their content digests, so a
    project moved (or copied) with its runs resumes, and other content, even at the same path, is refused."""
    import shutil

    from privacy.federated.server_checkpoint import content_digest

    start, corpus = _start_and_corpus(tmp_path / "old")
    paths = {"task-checkpoint": str(start), "task-data-dir": str(corpus)}
    whole = run_federated({**TINY, **paths, "run-dir": str(tmp_path / "whole")}, 2, backend="sequential")
    with pytest.raises(Stop):
        run_federated({**TINY, **paths, "run-dir": str(tmp_path / "old" / "run")}, 2, backend="sequential",
                      on_round=lambda e: (_ for _ in ()).throw(Stop) if e["server_round"] == 2 else None)
    saved = read_checkpoint(tmp_path / "old" / "run" / SERVER_CHECKPOINT)
    assert saved["location_digests"] == {"task-checkpoint": content_digest(start), "task-data-dir": content_digest(corpus)}

    shutil.copytree(tmp_path / "old", tmp_path / "new")  # the project, its files and the run, moved
    moved = {"task-checkpoint": str(tmp_path / "new" / "checkpoints" / "start.pt"),
             "task-data-dir": str(tmp_path / "new" / "datasets" / "corpus")}
    resumed = run_federated({**TINY, **moved, "run-dir": str(tmp_path / "new" / "run")}, 2, backend="sequential")
    assert resumed["resumed_after_round"] == [2] and resumed["rounds_completed"] == 4
    for name in whole["final_state"]:
        np.testing.assert_array_equal(resumed["final_state"][name], whole["final_state"][name])

    shutil.copytree(tmp_path / "old", tmp_path / "other")  # moved, and the corpus is another one
    (tmp_path / "other" / "datasets" / "corpus" / "manifests" / "train.tsv").write_text("s2/u1\ts2/u1.wav\n")
    other = {"task-checkpoint": str(tmp_path / "other" / "checkpoints" / "start.pt"),
             "task-data-dir": str(tmp_path / "other" / "datasets" / "corpus")}
    with pytest.raises(CheckpointMismatch, match=r"task-data-dir: '.*old/datasets/corpus \(content sha256 [0-9a-f]{16}\.\.\.\)' -> '.*other/datasets/corpus \(content"):
        run_federated({**TINY, **other, "run-dir": str(tmp_path / "other" / "run")}, 2, backend="sequential")

    start.write_bytes(b"another public start")  # the same path, other weights: refused, which comparing paths missed
    with pytest.raises(CheckpointMismatch, match="task-checkpoint: .*start.pt \\(content sha256"):
        run_federated({**TINY, **paths, "run-dir": str(tmp_path / "old" / "run")}, 2, backend="sequential")


def test_a_checkpoint_without_content_digests_compares_the_paths(tmp_path):
    start, corpus = _start_and_corpus(tmp_path / "old")
    cfg = resolve_run_config({**TINY, "task-checkpoint": str(start), "task-data-dir": str(corpus)})
    saved = {"config": dict(cfg), "client_states": None}  # as written before the digests were kept
    check_resumable(tmp_path / SERVER_CHECKPOINT, saved, cfg, grid=None)
    moved = {**cfg, "task-checkpoint": str(tmp_path / "elsewhere.pt")}
    with pytest.raises(CheckpointMismatch, match="task-checkpoint: .*start.pt' -> .*elsewhere.pt'"):
        check_resumable(tmp_path / SERVER_CHECKPOINT, saved, moved, grid=None)
