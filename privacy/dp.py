"""Differential privacy for the federated Wav2Vec2 variant: Opacus DP-SGD and privacy accounting.

Plain functions and classes (no Hydra, no Flower); the Flower apps in
``privacy/federated`` call them.

Two guarantees, never mixed up:

* **Local (sample-level) DP** on each client: DP-SGD with Opacus
  (:func:`make_private_local`). Per-sample gradients are clipped to L2 norm
  ``max_grad_norm`` (C) and Gaussian noise N(0, sigma^2 C^2) is added to their
  sum before averaging, with Poisson sampling at rate q = 1 / len(data_loader).
  The guarantee protects one *utterance* of a client's data. Flower re-creates
  the ClientApp every round, so the privacy budget must be composed over *all*
  rounds: :class:`ClientPrivacyAccountant` keeps the (sigma, q, steps) history
  in a JSON/ConfigRecord-friendly dict that lives in ``context.state``, and
  ``total_steps`` given to :func:`make_private_local` is the total planned over
  all rounds, so sigma is the same every round and the plan ends at the target.
* **Central (user-level) DP** on the server (DP-FedAvg, McMahan et al. 2018) is
  Flower's ``DifferentialPrivacyServerSideFixedClipping`` with its accountant,
  assembled in :func:`privacy.federated.strategy.build_strategy`: each sampled
  client's update is clipped to L2 norm C, the equal-weight mean gets Gaussian
  noise of standard deviation ``sigma * C / n``. This module only answers its
  budget questions: :func:`central_epsilon` (``rounds`` Gaussian releases, no
  sampling amplification, as Flower's accountant counts them) and
  :func:`central_noise_multiplier_for_budget`.

Accounting: Opacus' RDP (or PRV) accountant; :func:`independent_epsilon` cross-
checks it with Google's ``dp_accounting`` (RDP or PLD), using the DpEvent
``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

MAX_SANE_NOISE_MULTIPLIER = 1.0e3
ACCOUNTANTS = ("rdp", "prv")


class DPPlanError(ValueError):
    """A DP configuration that cannot give the requested guarantee."""


# --------------------------------------------------------------------------- accounting
def _opacus_epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def opacus_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of `steps` Poisson-sampled Gaussian steps as Opacus' accountant computes it."""
    _check_accountant(accountant)
    return _opacus_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)


def independent_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, method: str = "rdp"
) -> float:
    """Epsilon from Google's ``dp_accounting`` (independent of Opacus) for the same mechanism.

    method: "rdp" (RdpAccountant with its default orders) or "prv"/"pld" (PLDAccountant,
    a numerical privacy-loss-distribution accountant, the analogue of Opacus' PRV).
    """
    import dp_accounting
    from dp_accounting import pld, rdp

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), int(steps)
    )
    if method == "rdp":
        acc = rdp.RdpAccountant()
    elif method in ("prv", "pld"):
        acc = pld.PLDAccountant()
    else:
        raise ValueError(f"method must be 'rdp', 'prv' or 'pld', got {method!r}")
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def noise_multiplier_for_budget(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    max_noise_multiplier: float = MAX_SANE_NOISE_MULTIPLIER,
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) so that `steps` steps at rate `sample_rate` stay within (eps, delta)."""
    _check_accountant(accountant)
    _check_budget_args(target_epsilon, delta, sample_rate, steps)
    return _noise_multiplier_for_budget_cached(
        float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant, float(max_noise_multiplier)
    )


@functools.lru_cache(maxsize=256)
def _noise_multiplier_for_budget_cached(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, max_noise_multiplier: float
) -> float:
    # Opacus' search takes 1-2 s; a federated client asks the same question every round
    # (the plan is fixed), so the answer is memoised per process. Errors are not cached.
    from opacus.accountants.utils import get_noise_multiplier

    eps_at_max = opacus_epsilon(max_noise_multiplier, sample_rate, steps, delta, accountant)
    if eps_at_max > target_epsilon:
        raise DPPlanError(
            f"target_epsilon={target_epsilon} with delta={delta} is unreachable for {steps} steps at sample_rate="
            f"{sample_rate:.4g}: even noise_multiplier={max_noise_multiplier:g} gives epsilon={eps_at_max:.4g}. "
            f"Plan fewer steps/rounds, a smaller sampling rate, or a larger epsilon."
        )
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=int(steps),
                accountant=accountant,
            )
        )
    except ValueError as err:
        raise DPPlanError(
            f"Opacus could not find a noise multiplier for target_epsilon={target_epsilon}, delta={delta}, "
            f"sample_rate={sample_rate:.4g}, steps={steps}: {err}"
        ) from err


def central_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """User-level epsilon of `rounds` Gaussian releases (noise sigma*C on the clipped sum) without sampling
    amplification, as Flower's central-DP accountant (dp-accounting RDP) counts them."""
    return independent_epsilon(noise_multiplier, 1.0, rounds, delta, "rdp")


def central_noise_multiplier_for_budget(
    target_epsilon: float, target_delta: float, rounds: int, max_noise_multiplier: float = 1e4
) -> float:
    """Smallest noise multiplier (to 1e-3 relative) whose `rounds` central releases stay within (target_epsilon, target_delta).

    Raises ValueError if even ``max_noise_multiplier`` (dp.max_noise_multiplier) does not reach the budget."""
    low, high = 1e-2, 1.0
    if central_epsilon(max_noise_multiplier, rounds, target_delta) > target_epsilon:
        raise ValueError(
            f"no noise multiplier <= {max_noise_multiplier:g} (dp.max_noise_multiplier) reaches epsilon {target_epsilon} "
            f"in {rounds} rounds at delta {target_delta}"
        )
    while central_epsilon(high, rounds, target_delta) > target_epsilon:
        high *= 2
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if central_epsilon(mid, rounds, target_delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def _check_budget_args(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> None:
    if not target_epsilon > 0:
        raise DPPlanError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise DPPlanError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise DPPlanError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if int(steps) < 1:
        raise DPPlanError(f"the number of steps/rounds must be >= 1, got {steps}")


@dataclass
class ClientPrivacyAccountant:
    """One client's privacy ledger, kept across Flower rounds.

    ``history`` holds (noise_multiplier, sample_rate, steps) entries, consecutive
    identical (sigma, q) merged. The whole state is a flat dict of lists of
    numbers (:meth:`to_state`), valid both as JSON and as a Flower ``ConfigRecord``,
    so it survives in ``context.state`` between rounds although the ClientApp is
    re-created for every message.
    """

    mechanism: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_accountant(self.mechanism)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if steps <= 0:
            return
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1:
            raise ValueError(f"invalid DP step: noise_multiplier={noise_multiplier}, sample_rate={sample_rate}")
        if self.history and self.history[-1][0] == noise_multiplier and self.history[-1][1] == sample_rate:
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + int(steps))
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon composed over every recorded step of every round so far."""
        return _opacus_epsilon(self.history, delta, self.mechanism)

    def budget_exhausted(self, target_epsilon: float, delta: float) -> bool:
        return self.epsilon(delta) >= target_epsilon

    def step_hook(self, sample_rate: float) -> Callable[[Any], None]:
        """A DPOptimizer step hook recording one step (virtual steps with accumulation count as one)."""

        def hook(optimizer) -> None:
            self.record(optimizer.noise_multiplier, sample_rate * getattr(optimizer, "accumulated_iterations", 1), 1)

        return hook

    def to_state(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "noise_multiplier": [float(s) for s, _, _ in self.history],
            "sample_rate": [float(q) for _, q, _ in self.history],
            "steps": [int(n) for _, _, n in self.history],
        }

    @classmethod
    def from_state(cls, state: Optional[Mapping[str, Any]]) -> "ClientPrivacyAccountant":
        if not state:
            return cls()
        try:
            sigmas, rates, steps = (list(state[k]) for k in ("noise_multiplier", "sample_rate", "steps"))
        except KeyError as err:
            raise ValueError(f"privacy accountant state misses key {err}; got keys {sorted(state)}") from err
        if not len(sigmas) == len(rates) == len(steps):
            raise ValueError(
                f"privacy accountant state has lists of different lengths: noise_multiplier={len(sigmas)}, "
                f"sample_rate={len(rates)}, steps={len(steps)}"
            )
        return cls(
            mechanism=str(state.get("mechanism", "rdp")),
            history=[(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps)],
        )


# --------------------------------------------------------------------------- local DP-SGD
def modules_without_grad_sampler(model: nn.Module) -> list[str]:
    """Modules owning trainable parameters for which Opacus has no per-sample-gradient sampler.

    Opacus' ModuleValidator accepts e.g. a weight-normed (parametrised) Conv1d or a module with
    a bare trainable ``nn.Parameter`` (wav2vec2's ``masked_spec_embed``), but training then
    fails with "Per sample gradient is not initialized". This stricter check finds them first.
    """
    from opacus import GradSampleModule

    problems = []
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in GradSampleModule.GRAD_SAMPLERS:
            problems.append(f"module {name or '<root>'!r} ({type(module).__name__}) owns trainable {own}")
    return problems


def dp_validation_errors(model: nn.Module) -> list[str]:
    """Why Opacus cannot DP-train a model (BatchNorm, layers without a per-sample sampler ...), as strings.

    Empty list = trainable with Opacus' hooks mode.
    """
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # Opacus validates training mode; the model is trained in that mode anyway
    try:
        errors = [str(e) for e in ModuleValidator.validate(model, strict=False)]
    finally:
        model.train(was_training)
    return errors + [
        f"{problem}, but Opacus has no per-sample gradient sampler for it (freeze it or replace it)"
        for problem in modules_without_grad_sampler(model)
    ]


def check_model_for_dp(model: nn.Module) -> None:
    """Raise naming the offending modules if Opacus cannot train the model (e.g. BatchNorm)."""
    batch_norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    errors = dp_validation_errors(model)
    if batch_norms or errors:
        detail = "; ".join(errors)
        hint = (
            f"BatchNorm mixes samples of a batch, so per-sample DP is impossible: modules {batch_norms}. "
            "Fix with opacus.validators.ModuleValidator.fix(model) (BatchNorm -> GroupNorm). "
            if batch_norms
            else ""
        )
        raise DPPlanError(f"model is not DP-trainable with Opacus. {hint}Opacus says: {detail}")


def validate_dp_plan(
    target_epsilon: float,
    delta: float,
    n_samples: int,
    steps: int,
    sample_rate: float,
    model: Optional[nn.Module] = None,
    accountant: str = "rdp",
    max_noise_multiplier: float = MAX_SANE_NOISE_MULTIPLIER,
) -> float:
    """Check a DP-SGD plan at start-up; returns the noise multiplier it needs.

    Errors (DPPlanError) for: delta >= 1/N (a mechanism that leaks one record
    with probability delta would then be allowed to leak a whole record),
    a budget not reachable with a noise multiplier <= ``max_noise_multiplier``,
    bad rates/steps, and a model Opacus cannot train (BatchNorm, ...).
    """
    if int(n_samples) < 1:
        raise DPPlanError(f"n_samples must be >= 1, got {n_samples}")
    if not 0 < delta < 1.0 / n_samples:
        raise DPPlanError(
            f"delta={delta:g} must be < 1/N = 1/{n_samples} = {1.0 / n_samples:.3g} "
            f"(N = number of training samples of the client); use e.g. delta <= {0.1 / n_samples:.2g}"
        )
    if model is not None:
        check_model_for_dp(model)
    return noise_multiplier_for_budget(target_epsilon, delta, sample_rate, steps, accountant, max_noise_multiplier)


def local_sample_rate(data_loader) -> float:
    """The sampling rate Opacus assigns to a loader: 1 / number of batches."""
    n = len(data_loader)
    if n < 1:
        raise DPPlanError("the client data loader is empty")
    return 1.0 / n


class CTCCriterion(nn.Module):
    """CTC loss over (logits, labels) with a switchable ``reduction``, as Opacus' ghost clipping needs.

    logits: (B, T, V) raw scores; labels: (B, L) token ids padded with -100 (or any negative);
    input_lengths: (B,) valid frames (default: all T). Per sample the loss is divided by its
    target length (as Wav2Vec2ForCTC with ctc_loss_reduction="mean"); "mean" then averages
    over the batch, "sum" sums, "none" returns the (B,) vector.
    """

    def __init__(self, blank: int = 0, zero_infinity: bool = True, reduction: str = "mean"):
        super().__init__()
        self.blank, self.zero_infinity, self.reduction = blank, zero_infinity, reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, input_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, frames, _ = logits.shape
        if input_lengths is None:
            input_lengths = torch.full((batch,), frames, dtype=torch.long, device=logits.device)
        valid = labels >= 0
        target_lengths = valid.sum(-1)
        log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        per_sample = nn.functional.ctc_loss(
            log_probs, labels.masked_select(valid), input_lengths, target_lengths,
            blank=self.blank, reduction="none", zero_infinity=self.zero_infinity,
        ) / target_lengths.clamp(min=1)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def make_private_local(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    target_epsilon: float,
    target_delta: float,
    epochs_or_steps: int,
    max_grad_norm: float,
    accountant: str = "rdp",
    poisson_sampling: bool = True,
    grad_sample_mode: str = "hooks",
    client_accountant: Optional[ClientPrivacyAccountant] = None,
    generator: Optional[torch.Generator] = None,
    criterion: Optional[nn.Module] = None,
    max_noise_multiplier: float = MAX_SANE_NOISE_MULTIPLIER,
):
    """Wrap a client's model/optimizer/loader for DP-SGD with Opacus.

    Randomness: the Gaussian noise AND the Poisson sampling both come from
    ``generator``; None (the default, and the only private choice) means a fresh
    :func:`csprng_generator`, whose state comes from the OS CSPRNG and is never
    stored, so nobody (the server included) can regenerate the noise or the
    batches from the configuration. Opacus' ``secure_mode`` code path is used
    for both (its noise is a sum of Gaussians that resists the floating-point
    attack of Mironov 2012 / Jin et al. 2021); Opacus would take the generator
    from ``torchcsprng``, which has no build for this torch, so the generator is
    supplied here. Pass a seeded generator only for tests or the explicitly
    NOT-PRIVATE reproducible option.

    ``epochs_or_steps`` is the TOTAL number of optimizer steps planned on this
    client over ALL rounds (e.g. rounds * local_steps); sigma is calibrated for
    that whole plan so that the composed epsilon ends at ``target_epsilon``.
    Returns (model, optimizer, data_loader, noise_multiplier); with
    ``grad_sample_mode="ghost"`` Opacus also wraps the loss:
    (model, optimizer, criterion, data_loader, noise_multiplier) — train with
    ``loss = criterion(outputs, targets)`` from that wrapped criterion.

    If ``client_accountant`` is given, every real DP step is recorded in it
    (the optimizer's step hook is chained), so ``client_accountant.epsilon(delta)``
    is the budget spent over all rounds.
    """
    _check_accountant(accountant)
    check_model_for_dp(model)
    sample_rate = local_sample_rate(data_loader)
    n_samples = len(data_loader.dataset)
    noise_multiplier = validate_dp_plan(
        target_epsilon, target_delta, n_samples, int(epochs_or_steps), sample_rate,
        accountant=accountant, max_noise_multiplier=max_noise_multiplier,
    )
    engine = _secure_mode_engine(accountant, generator if generator is not None else csprng_generator())
    kwargs = dict(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode,
    )
    if "ghost" in grad_sample_mode:
        kwargs["criterion"] = criterion if criterion is not None else nn.CrossEntropyLoss()
        private_model, private_optimizer, private_criterion, private_loader = engine.make_private(**kwargs)
    else:
        private_model, private_optimizer, private_loader = engine.make_private(**kwargs)
    private_optimizer.privacy_engine = engine  # keeps Opacus' own accountant reachable for cross-checks

    if client_accountant is not None:
        engine_hook = private_optimizer.step_hook
        record = client_accountant.step_hook(sample_rate)

        def chained(opt) -> None:
            engine_hook(opt)
            record(opt)

        private_optimizer.attach_step_hook(chained)

    if "ghost" in grad_sample_mode:
        return private_model, private_optimizer, private_criterion, private_loader, noise_multiplier
    return private_model, private_optimizer, private_loader, noise_multiplier


_MT_STATE_OFFSET, _MT_STATE_WORDS = 24, 624  # torch's CPU generator state: seed (8), left (4), seeded (4), next (8), 624 x uint64


def csprng_generator() -> torch.Generator:
    """A CPU ``torch.Generator`` whose whole Mersenne-Twister state comes from the OS CSPRNG (``os.urandom``).

    ``manual_seed(s)`` would not do: torch initialises the 624-word state from the
    low 32 bits of ``s`` only, so 2**32 guesses would regenerate the noise. Here
    all 624 state words (19,968 bits) are written from ``os.urandom``; they exist
    only inside this generator and are never stored or sent.
    """
    import os

    import numpy as np

    probe = torch.Generator().manual_seed(0x1234_5678_9ABC)
    state = probe.get_state().numpy().copy()
    words = state[_MT_STATE_OFFSET : _MT_STATE_OFFSET + 8 * _MT_STATE_WORDS].view(np.uint64)
    if words[0] != 0x1234_5678_9ABC & 0xFFFF_FFFF:  # layout check: word 0 = low 32 bits of the seed
        raise RuntimeError("torch's CPU generator state layout is not the expected one; cannot seed it from the OS CSPRNG")
    words[:] = np.frombuffer(os.urandom(4 * _MT_STATE_WORDS), dtype=np.uint32).astype(np.uint64)
    generator = torch.Generator()
    generator.set_state(torch.from_numpy(state))
    return generator


def _secure_mode_engine(accountant: str, generator: torch.Generator):
    """An Opacus PrivacyEngine on its secure_mode code path, with ``generator`` as its random source (see make_private_local)."""
    import warnings

    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # it is on: set just below
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)  # True would import torchcsprng
    engine.secure_mode = True
    engine.secure_rng = generator  # Opacus draws the noise and the Poisson batches from it
    return engine


def dp_step_on_empty_batch(optimizer) -> None:
    """The DP-SGD step for a Poisson batch that drew no example: pure noise, applied and accounted.

    With Poisson sampling an empty batch is a normal outcome of the mechanism,
    and the accountant assumes every planned step releases "sum of clipped
    gradients + N(0, sigma^2 C^2)". Skipping the step would release something
    else (no noise, and the visible fact that nobody was sampled) and leave the
    step out of the ledger. Opacus clips and noises an empty per-sample gradient
    (shape (0, ...)) correctly, so we hand it one and take the step: the noise is
    added, the update applied and the step hook records it.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
