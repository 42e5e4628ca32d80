"""Local (sample-level) DP-SGD for one client round, composed over rounds.

Adapter between the ClientApp and privacy/dp.py (Opacus). The noise multiplier
is calibrated once for the client's whole plan, ``num-rounds x steps per round``
DP-SGD steps (a client sampled in fewer rounds spends less), so that the
composed epsilon ends at ``target-epsilon``. The :class:`ClientPrivacyAccountant`
history comes from ``context.state`` and goes back there after the round, so
``epsilon`` is over ALL rounds so far, not just this one.

Randomness: every round draws its noise and its Poisson batches from a fresh
:func:`privacy.dp.csprng_generator` (state from the OS CSPRNG, never stored, never
sent), so a server that knows the whole configuration and seed cannot
regenerate them, and two clients never share noise. Only the run-config option
``dp-reproducible-noise-NOT-PRIVATE`` seeds them from (seed, partition, steps
so far) instead; such a run gives no privacy and is marked "NOT PRIVATE" in its
metrics and tables.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from privacy.dp import ClientPrivacyAccountant, csprng_generator, make_private_local


class LocalPrivacyBudgetExhausted(RuntimeError):
    pass


class LocalDPSession:
    def __init__(self, cfg: Mapping[str, Any], accountant: ClientPrivacyAccountant, num_examples: int, partition_id: int = 0):
        self.cfg = cfg
        self.accountant = accountant
        self.num_examples = num_examples
        self.partition_id = int(partition_id)
        self.noise_multiplier: Optional[float] = None

    @classmethod
    def from_run_config(
        cls, cfg: Mapping[str, Any], num_examples: int, saved_state: Optional[str], partition_id: int = 0
    ) -> "LocalDPSession":
        if saved_state:
            accountant = ClientPrivacyAccountant.from_state(json.loads(saved_state))
        else:
            accountant = ClientPrivacyAccountant(mechanism=str(cfg["dp-accountant"]))
        target, delta = float(cfg["target-epsilon"]), float(cfg["target-delta"])
        if accountant.steps and accountant.budget_exhausted(target, delta):
            raise LocalPrivacyBudgetExhausted(
                f"local privacy budget exhausted: epsilon {accountant.epsilon(delta):.3f} >= target {target} after {accountant.steps} steps"
            )
        return cls(cfg, accountant, num_examples, partition_id)

    def planned_steps(self, loader) -> int:
        per_round = int(self.cfg["local-steps"]) or int(self.cfg["local-epochs"]) * len(loader)
        return max(1, per_round * int(self.cfg["num-rounds"]))

    @property
    def reproducible(self) -> bool:
        return bool(self.cfg["dp-reproducible-noise-NOT-PRIVATE"])

    def generator(self, device: torch.device | None = None) -> torch.Generator:
        """This round's source of noise and Poisson batches (see the module docstring)."""
        if device is not None and torch.device(device).type != "cpu":
            raise NotImplementedError(
                f"local DP with the model on {device}: the CSPRNG-seeded generator is a CPU generator, and Opacus draws "
                f"the noise on the model's device with it; run DP clients on the CPU (device=cpu)"
            )
        if self.reproducible:
            return torch.Generator().manual_seed(int(self.cfg["seed"]) * 7919 + self.partition_id * 104_729 + self.accountant.steps)
        return csprng_generator()

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader):
        private_model, private_optimizer, private_loader, sigma = make_private_local(
            model,
            optimizer,
            loader,
            target_epsilon=float(self.cfg["target-epsilon"]),
            target_delta=float(self.cfg["target-delta"]),
            epochs_or_steps=self.planned_steps(loader),
            max_grad_norm=float(self.cfg["max-grad-norm"]),
            accountant=str(self.accountant.mechanism),
            poisson_sampling=bool(self.cfg["dp-poisson-sampling"]),
            max_noise_multiplier=float(self.cfg["dp-max-noise-multiplier"]),
            client_accountant=self.accountant,
            generator=self.generator(next(model.parameters()).device),
        )
        self.noise_multiplier = float(sigma)
        return private_model, private_optimizer, private_loader

    def epsilon(self, delta: float) -> float:
        value = self.accountant.epsilon(delta)
        return float(value) if math.isfinite(value) else float("inf")

    def to_json(self) -> str:
        return json.dumps(self.accountant.to_state())

    def restore(self, saved: str, steps: int) -> None:
        """Continue the ledger of a :meth:`to_json` (a checkpoint's, after its `steps` steps), before :meth:`attach`:
        the steps recorded from then on add to it."""
        accountant = ClientPrivacyAccountant.from_state(json.loads(saved))
        if accountant.mechanism != self.accountant.mechanism:
            raise ValueError(f"the saved privacy ledger composes with the {accountant.mechanism!r} accountant, this run with "
                             f"{self.accountant.mechanism!r} (dp-accountant)")
        if accountant.steps != int(steps):
            raise ValueError(f"the state is after step {steps} but its privacy ledger counts {accountant.steps} steps")
        self.accountant = accountant
