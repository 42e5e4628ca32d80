"""Local (sample-level) DP-SGD for one client round, composed over rounds.

Adapter between the ClientApp and privacy/dp.py (Opacus). The noise multiplier
is calibrated once for the client's whole plan, ``num-rounds x steps per round``
DP-SGD steps (a client sampled in fewer rounds spends less), so that the
composed epsilon ends at ``target-epsilon``. The :class:`ClientPrivacyAccountant`
history comes from ``context.state`` and goes back there after the round, so
``epsilon`` is over ALL rounds so far, not just this one.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from privacy.dp import ClientPrivacyAccountant, make_private_local


class LocalPrivacyBudgetExhausted(RuntimeError):
    pass


class LocalDPSession:
    def __init__(self, cfg: Mapping[str, Any], accountant: ClientPrivacyAccountant, num_examples: int):
        self.cfg = cfg
        self.accountant = accountant
        self.num_examples = num_examples
        self.noise_multiplier: Optional[float] = None

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any], num_examples: int, saved_state: Optional[str]) -> "LocalDPSession":
        accountant = ClientPrivacyAccountant.from_state(json.loads(saved_state) if saved_state else None)
        target, delta = float(cfg["target-epsilon"]), float(cfg["target-delta"])
        if accountant.steps and accountant.budget_exhausted(target, delta):
            raise LocalPrivacyBudgetExhausted(
                f"local privacy budget exhausted: epsilon {accountant.epsilon(delta):.3f} >= target {target} after {accountant.steps} steps"
            )
        return cls(cfg, accountant, num_examples)

    def planned_steps(self, loader) -> int:
        per_round = int(self.cfg["local-steps"]) or int(self.cfg["local-epochs"]) * len(loader)
        return max(1, per_round * int(self.cfg["num-rounds"]))

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader):
        # On the model's device: Opacus draws the noise where the gradients are.
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(int(self.cfg["seed"]) * 7919 + self.accountant.steps)
        private_model, private_optimizer, private_loader, sigma = make_private_local(
            model,
            optimizer,
            loader,
            target_epsilon=float(self.cfg["target-epsilon"]),
            target_delta=float(self.cfg["target-delta"]),
            epochs_or_steps=self.planned_steps(loader),
            max_grad_norm=float(self.cfg["max-grad-norm"]),
            client_accountant=self.accountant,
            noise_generator=generator,
        )
        self.noise_multiplier = float(sigma)
        return private_model, private_optimizer, private_loader

    def epsilon(self, delta: float) -> float:
        value = self.accountant.epsilon(delta)
        return float(value) if math.isfinite(value) else float("inf")

    def to_json(self) -> str:
        return json.dumps(self.accountant.to_state())
