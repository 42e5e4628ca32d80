"""Two-process data-parallel training with torchrun on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from training import ddp

PROJECT_ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from training import ddp
    from training.run_logger import RunLogger
    from training.loop import train
    from training.optim import build_optimizer, build_scheduler
    from common.seeding import seed_everything
    from tests.test_loop import ResumableBatchSampler

    out_dir = sys.argv[1]
    rank, world, local_rank = ddp.setup_distributed()
    seed_everything(100 + rank)  # different per rank: DDP must still start from rank 0's weights
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    loader = DataLoader(data, batch_sampler=ResumableBatchSampler(32, 4, seed=0, rank=rank, world_size=world))
    ddp_model = ddp.wrap_ddp(model)
    opt = build_optimizer(model, lr=0.05)
    sched = build_scheduler(opt, 3, schedule="cosine", warmup_frac=0.0, hold_frac=0.0)

    def step_fn(m, batch):
        xb, yb = batch
        loss = nn.functional.mse_loss(m(xb), yb)
        return loss, {"rank": float(rank)}

    logger = RunLogger(out_dir, enabled=ddp.is_main())
    res = train(ddp_model, step_fn, loader, opt, sched, max_steps=3, ckpt_dir=out_dir + "/ckpt", ckpt_every=2,
                logger=logger, log_every=1, progress_bar=False)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    with open(f"{out_dir}/params_rank{rank}.json", "w") as f:
        json.dump({"params": flat.tolist(), "step": res.step, "world": world}, f)
    ddp.cleanup()
    """
)


def test_torchrun_two_processes_end_with_identical_parameters(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"params_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [3, 3]
    assert torch.equal(torch.tensor(ranks[0]["params"]), torch.tensor(ranks[1]["params"]))
    # only rank 0 wrote logs and checkpoints; logged metrics are means over ranks
    entries = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2, 3]
    assert all(e["train/rank"] == 0.5 for e in entries)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint_*.pt")) == ["checkpoint_2.pt", "checkpoint_3.pt", "checkpoint_last.pt"]
    # the checkpoint holds both ranks' RNG states, and the saved weights are the trained ones
    from training.train_state import load_checkpoint

    state = load_checkpoint(tmp_path / "ckpt" / "checkpoint_last.pt")
    assert len(state["rng"]) == 2 and state["world_size"] == 2
    saved = torch.cat([v.flatten() for v in state["model"].values()])
    assert torch.equal(saved, torch.tensor(ranks[0]["params"]))


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ddp.setup_distributed() == (0, 1, 0)
    assert ddp.is_main() and ddp.world_size() == 1
    model = torch.nn.Linear(2, 2)
    assert ddp.wrap_ddp(model) is model and ddp.unwrap(model) is model
    assert ddp.all_reduce_mean({"a": 2.0}) == {"a": 2.0}
    assert ddp.any_rank(True) and not ddp.any_rank(False)
    assert ddp.all_gather_object({"x": 1}) == [{"x": 1}]
