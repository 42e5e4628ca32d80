"""The shared training loop: schedules, optimizer groups, exact resume, bad steps, hook order, logs."""

from __future__ import annotations

import csv
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.files import read_jsonl
from training.run_logger import RunLogger, plot_curves
from training.loop import TrainingDiverged, train
from training.optim import build_optimizer, build_scheduler, lr_schedule
from common.seeding import seed_everything

# --------------------------------------------------------------------------- schedules


def test_tri_stage_values_at_key_steps():
    kw = dict(max_steps=100, schedule="tri_stage", warmup_frac=0.1, hold_frac=0.4, final_lr_scale=0.05, init_lr_scale=0.01)
    assert lr_schedule(0, **kw) == pytest.approx(0.01)
    assert lr_schedule(5, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_schedule(10, **kw) == 1.0  # hold starts
    assert lr_schedule(49, **kw) == 1.0  # hold ends
    assert lr_schedule(50, **kw) == pytest.approx(1.0)  # decay starts at exp(0)
    assert lr_schedule(75, **kw) == pytest.approx(math.sqrt(0.05))  # half-way in log space
    assert lr_schedule(100, **kw) == pytest.approx(0.05)
    assert lr_schedule(1000, **kw) == pytest.approx(0.05)
    decay = [lr_schedule(s, **kw) for s in range(50, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_cosine_and_constant_values():
    kw = dict(max_steps=110, warmup_frac=10 / 110, hold_frac=0.0, final_lr_scale=0.1, init_lr_scale=0.0)
    assert lr_schedule(0, schedule="cosine", **kw) == 0.0
    assert lr_schedule(5, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_schedule(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_schedule(60, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_schedule(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_schedule(5, schedule="constant", **kw) == pytest.approx(0.5)
    assert lr_schedule(100, schedule="constant", **kw) == 1.0


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="schedule='linear'"):
        lr_schedule(0, 10, schedule="linear")
    with pytest.raises(ValueError, match="warmup_frac"):
        lr_schedule(0, 10, warmup_frac=0.7, hold_frac=0.5)


def test_scheduler_drives_optimizer_lr():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer([p], lr=2.0)
    sched = build_scheduler(opt, 20, schedule="tri_stage", warmup_frac=0.25, hold_frac=0.25, final_lr_scale=0.05)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * lr_schedule(s, 20, "tri_stage", 0.25, 0.25, 0.05) for s in range(20)]
    assert seen == pytest.approx(expected)


def test_optimizer_groups_skip_decay_on_bias_norm_and_frozen():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay[0.1] == {id(model[0].weight)}
    assert by_decay[0.0] == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert opt.defaults["betas"] == (0.9, 0.98)
    # param groups keep their own options (e.g. a larger lr for privacy masks)
    opt2 = build_optimizer([{"params": list(model[0].named_parameters()), "lr": 0.5}], lr=1e-3, weight_decay=0.1)
    assert [g["lr"] for g in opt2.param_groups] == [0.5, 0.5]
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), lr=1.0)


# --------------------------------------------------------------------------- a tiny task


class NoisyRegression(Dataset):
    """x -> sum(x); each access adds augmentation noise from the global torch RNG."""

    def __init__(self, n: int = 40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + 0.05 * torch.randn(4)
        return x, self.x[i].sum(0, keepdim=True)


class ResumableBatchSampler:
    """Shuffled batches with the interface data/samplers.py provides (epoch + batches consumed)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def _batches(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order = order[self.rank :: self.world_size]
        return [order[i : i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]

    def set_epoch(self, epoch):
        self.epoch, self.skip = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches_consumed": self.skip, "seed": self.seed}

    def load_state_dict(self, state):
        self.epoch, self.skip = state["epoch"], state["batches_consumed"]

    def __iter__(self):
        skip, self.skip = self.skip, 0
        yield from self._batches()[skip:]

    def __len__(self):
        return len(self._batches())


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 1)
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.norm(self.inp(x)))))


def build_task(seed: int = 0, max_steps: int = 10, sampler: str = "test"):
    seed_everything(seed)
    model = TinyNet()
    noise = torch.Generator().manual_seed(seed + 100)
    if sampler == "test":
        loader = DataLoader(NoisyRegression(), batch_sampler=ResumableBatchSampler(40, 8, seed=seed))
    else:  # the project's sampler behind a prefetching DataLoader iterator (no augmentation RNG in workers)
        from data.samplers import BucketBatchSampler

        x = NoisyRegression().x
        plain = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        loader = DataLoader(plain, batch_sampler=BucketBatchSampler(list(range(40)), 8, seed=seed, bucket_batches=2),
                            num_workers=1, prefetch_factor=3)
    opt = build_optimizer(model, lr=3e-2, weight_decay=0.01)
    sched = build_scheduler(opt, max_steps, schedule="tri_stage", warmup_frac=0.2, hold_frac=0.2, final_lr_scale=0.1)

    def step_fn(model, batch):
        x, y = batch
        x = x + 0.1 * torch.randn(x.shape, generator=noise)  # a noise source with its own generator
        x = x * (1.0 + 0.01 * np.random.rand()) * (1.0 + 0.01 * random.random())  # numpy and python RNGs too
        loss = nn.functional.mse_loss(model(x), y)
        return loss, {"mse": loss.detach(), "noise_draw": float(torch.rand(()))}

    def eval_fn(model, step):
        torch.rand(5), np.random.rand(), random.random(), torch.rand(3, generator=noise)  # must not disturb training
        x = torch.linspace(-1, 1, 16).reshape(4, 4)
        return {"mse": nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))}

    return model, step_fn, eval_fn, loader, opt, sched, {"noise": noise}


class Crash(Exception):
    pass


@pytest.mark.parametrize("log_every,sampler", [(1, "test"), (4, "test"), (2, "project")])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, log_every, sampler):
    common = dict(max_steps=10, log_every=log_every, eval_every=5, ckpt_every=3, grad_clip=1.0, progress_bar=False)

    # uninterrupted
    model, step_fn, eval_fn, loader, opt, sched, gens = build_task(sampler=sampler)
    hook_steps_full = []
    logger = RunLogger(tmp_path / "full")
    res = train(model, step_fn, loader, opt, sched, ckpt_dir=tmp_path / "full" / "ckpt", logger=logger, eval_fn=eval_fn,
                after_optimizer_step=hook_steps_full.append, generators=gens, **common)
    logger.close()
    assert res.step == 10 and hook_steps_full == list(range(10))
    full_state = {k: v.clone() for k, v in model.state_dict().items()}

    # crash during update index 7 (after the checkpoint at step 6 and the logs of step 7)
    model, step_fn, eval_fn, loader, opt, sched, gens = build_task(sampler=sampler)
    frozen_before = model.frozen.clone()

    def crash_hook(step):
        if step == 7:
            raise Crash()

    logger = RunLogger(tmp_path / "resumed")
    with pytest.raises(Crash):
        train(model, step_fn, loader, opt, sched, ckpt_dir=tmp_path / "resumed" / "ckpt", logger=logger, eval_fn=eval_fn,
              after_optimizer_step=crash_hook, generators=gens, **common)
    logger.close()

    # a fresh process: different seeds everywhere, everything must come from the checkpoint
    model, step_fn, eval_fn, loader, opt, sched, gens = build_task(seed=0, sampler=sampler)
    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    torch.nn.init.normal_(model.inp.weight)
    gens["noise"].manual_seed(12345)
    hook_steps_resumed = []
    logger = RunLogger(tmp_path / "resumed")
    res = train(model, step_fn, loader, opt, sched, ckpt_dir=tmp_path / "resumed" / "ckpt", logger=logger, eval_fn=eval_fn,
                after_optimizer_step=hook_steps_resumed.append, generators=gens, **common)
    logger.close()
    assert res.resumed_from.name == "checkpoint_6.pt"
    assert hook_steps_resumed == [6, 7, 8, 9]

    resumed_state = model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for k in full_state:
        assert torch.equal(full_state[k], resumed_state[k]), k
    assert torch.equal(model.frozen, frozen_before)  # frozen parameters never move

    def curve(run):
        return [(e["step"], {k: v for k, v in e.items() if not k.startswith("perf/")}) for e in read_jsonl(tmp_path / run / "log.jsonl")]

    full_curve, resumed_curve = curve("full"), curve("resumed")
    assert full_curve == resumed_curve
    assert [s for s, e in full_curve if "train/loss" in e] == list(range(log_every, 11, log_every)) + ([] if 10 % log_every == 0 else [10])
    assert [s for s, e in full_curve if "eval/mse" in e] == [5, 10]


def test_training_reduces_loss_and_writes_csv_json_logs_and_plot(tmp_path):
    model, step_fn, eval_fn, loader, opt, sched, gens = build_task(max_steps=30)
    with RunLogger(tmp_path, config_dict={"lr": 3e-2}) as logger:
        res = train(model, step_fn, loader, opt, sched, max_steps=30, logger=logger, eval_fn=eval_fn, log_every=5,
                    eval_every=15, generators=gens, progress_bar=False)
    entries = read_jsonl(tmp_path / "log.jsonl")
    losses = [e["train/loss"] for e in entries if "train/loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert {"train/mse", "train/noise_draw", "train/grad_norm", "lr", "train/bad_steps_total"} <= set(entries[0])
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    csv_losses = [float(r["value"]) for r in rows if r["key"] == "train/loss"]
    assert csv_losses == pytest.approx(losses)
    assert res.last_eval == {"eval/mse": pytest.approx([e for e in entries if "eval/mse" in e][-1]["eval/mse"])}
    png = plot_curves(tmp_path / "log.jsonl", tmp_path / "curves.png", keys=["train/loss", "eval/mse"])
    assert png.stat().st_size > 1000


def test_logger_writes_nonfinite_as_null_and_truncates_on_resume(tmp_path):
    logger = RunLogger(tmp_path)
    logger.log(1, {"a": 1.5})
    state = logger.state_dict()
    logger.log(2, {"a": float("nan"), "b": torch.tensor(2.0)})
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[1]) == {"step": 2, "a": None, "b": 2.0}
    RunLogger(tmp_path).load_state_dict(state)
    assert read_jsonl(tmp_path / "log.jsonl") == [{"step": 1, "a": 1.5}]
    assert (tmp_path / "log.csv").read_text() == "step,key,value\n1,a,1.5\n"


def test_logger_state_fsyncs_the_lines_it_counts(tmp_path, monkeypatch):
    """A checkpoint records the logs' byte lengths; those bytes must be on disk before it, or a machine crash leaves
    logs shorter than the checkpoint says (entries lost on resume)."""
    import training.run_logger as run_logger

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(run_logger.os, "fsync", recording_fsync)
    logger = RunLogger(tmp_path)
    logger.log(1, {"a": 1.5})
    assert synced == []  # appends are not flushed one by one
    state = logger.state_dict()
    assert sorted(synced) == sorted([(str((tmp_path / "log.csv").resolve()), state["csv_bytes"]),
                                     (str((tmp_path / "log.jsonl").resolve()), state["jsonl_bytes"])])


# --------------------------------------------------------------------------- bad steps and hook order


def test_nan_steps_are_skipped_and_counted(tmp_path):
    model, step_fn, _, loader, opt, sched, gens = build_task(max_steps=8)
    calls = {"n": 0}

    def flaky_step(model, batch):
        calls["n"] += 1
        loss, logs = step_fn(model, batch)
        if calls["n"] in (2, 5):  # non-finite loss
            return loss * float("nan"), logs
        if calls["n"] == 3:  # finite loss, NaN gradient: d sqrt(u)/du at u = 0 times 0
            w = model.inp.weight[0, 0]
            return loss + torch.sqrt((w - w.detach()) ** 2), logs
        return loss, logs

    updates = []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logger = RunLogger(tmp_path)
    res = train(model, flaky_step, loader, opt, sched, max_steps=8, logger=logger, log_every=8, max_bad_steps=3,
                after_optimizer_step=updates.append, generators=gens, progress_bar=False)
    assert res.step == 8 and res.bad_steps_total == 3 and calls["n"] == 11
    assert updates == list(range(8))
    assert sched.last_epoch == 8  # the schedule advanced only on real updates
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before["inp.weight"], model.inp.weight)
    assert read_jsonl(tmp_path / "log.jsonl")[-1]["train/bad_steps_total"] == 3


def test_training_stops_after_max_bad_steps_in_a_row():
    model, step_fn, _, loader, opt, sched, gens = build_task()
    calls = {"n": 0}

    def diverging(model, batch):
        calls["n"] += 1
        loss, logs = step_fn(model, batch)
        return (loss if calls["n"] <= 2 else loss + float("inf")), logs

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match=r"stopped at step 2 .*3 consecutive steps with a non-finite loss"):
        train(model, diverging, loader, opt, sched, max_steps=10, max_bad_steps=3, generators=gens, progress_bar=False)
    assert calls["n"] == 5
    assert not torch.equal(before["inp.weight"], model.inp.weight)  # the two good steps did update


def test_after_optimizer_step_hook_sees_updated_params_grads_and_unstepped_schedule():
    model, step_fn, _, loader, opt, sched, gens = build_task(max_steps=6)
    seen = []
    last = {"w": model.out.weight.detach().clone()}

    def hook(step):
        # after optimizer.step: parameters moved; before zero_grad: gradients exist (AdaLoRA reads them);
        # before scheduler.step: the current lr is still the one of update `step`.
        assert not torch.equal(model.out.weight, last["w"])
        assert model.out.weight.grad is not None and model.out.weight.grad.abs().sum() > 0
        assert opt.param_groups[0]["lr"] == pytest.approx(3e-2 * lr_schedule(step, 6, "tri_stage", 0.2, 0.2, 0.1))
        assert sched.last_epoch == step
        last["w"] = model.out.weight.detach().clone()
        seen.append(step)

    res = train(model, step_fn, loader, opt, sched, max_steps=6, after_optimizer_step=hook, generators=gens, progress_bar=False)
    assert seen == [0, 1, 2, 3, 4, 5] and res.step == 6
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none) ran after the hook


def test_refuses_to_mix_with_an_earlier_runs_checkpoints(tmp_path):
    model, step_fn, _, loader, opt, sched, gens = build_task(max_steps=2)
    train(model, step_fn, loader, opt, sched, max_steps=2, ckpt_dir=tmp_path, generators=gens, progress_bar=False)
    model, step_fn, _, loader, opt, sched, gens = build_task(max_steps=2)
    with pytest.raises(FileExistsError, match="earlier run"):
        train(model, step_fn, loader, opt, sched, max_steps=2, ckpt_dir=tmp_path, resume=False, generators=gens, progress_bar=False)
    # resuming a finished run does nothing and reports where it came from
    res = train(model, step_fn, loader, opt, sched, max_steps=2, ckpt_dir=tmp_path, generators=gens, progress_bar=False)
    assert res.step == 2 and res.resumed_from.name == "checkpoint_2.pt"


@pytest.mark.slow
def test_wandb_logger_runs_offline_inside_the_run_dir(tmp_path):
    from types import SimpleNamespace

    from training.run_logger import logger_from_config

    cfg = SimpleNamespace(name="wandb", project="test", mode="offline")
    logger = logger_from_config(cfg, tmp_path, {"lr": 1.0})
    logger.log(1, {"x": 1.0})
    state = logger.state_dict()
    logger.close()
    assert state["wandb_id"] and list((tmp_path / "wandb").glob(f"offline-run-*-{state['wandb_id']}"))
    assert read_jsonl(tmp_path / "log.jsonl") == [{"step": 1, "x": 1.0}]


def test_seed_torch_draws_what_torch_manual_seed_draws():
    """A federated client seeds torch with seed_torch (no lazy CUDA seeding on a CPU build): the same normal draws,
    dropout masks and permutations as after torch.manual_seed, and the same generator state."""
    from common.seeding import seed_torch

    def draws():
        return torch.randn(5), torch.nn.functional.dropout(torch.ones(64), 0.5, training=True), torch.randperm(9)

    for seed in (0, 1, 100003 * 3 + 1009 * 7 + 12345):
        torch.manual_seed(seed)
        expected, state = draws(), torch.get_rng_state()
        torch.manual_seed(seed + 1)  # move the generator away first
        seed_torch(seed)
        for got, want in zip(draws(), expected):
            assert torch.equal(got, want)
        assert torch.equal(torch.get_rng_state(), state)
