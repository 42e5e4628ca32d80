"""Parameter-efficient fine-tuning of the transformer encoder: AdaLoRA, LoRA or none (full).

AdaLoRA (Zhang et al. 2023, via peft) parameterises each adapted weight update as
P diag(E) Q and prunes singular values by importance: ranks start at `init_r`,
stay there for `tinit` steps, are cut every `deltaT` steps towards an average
of `target_r` until `total_step - tfinal`, then stay fixed. peft only does the
pruning when `update_and_allocate(step)` is called after each optimizer step,
and only adds the orthogonality regulariser when the wrapped model's output has
a `.loss`; ours does not, so `AdapterHandle` exposes both explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class AdapterSpec:
    kind: str = "adalora"  # none | lora | adalora
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    r: int = 8
    init_r: int = 12
    target_r: int = 4
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 10
    total_step: int = 1000
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5


def adalora_schedule(total_step: int, tinit_frac: float, tfinal_frac: float, delta_t: int) -> tuple[int, int, int]:
    """Derive (tinit, tfinal, deltaT) from the run length; peft needs tinit < total_step - tfinal."""
    tinit = int(round(tinit_frac * total_step))
    tfinal = int(round(tfinal_frac * total_step))
    if total_step - tfinal <= tinit:
        raise ValueError(
            f"AdaLoRA schedule is empty: tinit={tinit} >= total_step - tfinal = {total_step} - {tfinal}; "
            "lower adapter.tinit_frac / adapter.tfinal_frac or raise trainer.max_steps"
        )
    return tinit, tfinal, max(1, min(delta_t, total_step - tfinal - tinit))


class AdapterHandle:
    """What the training loop needs from an adapter, whatever its kind."""

    def __init__(self, spec: AdapterSpec, peft_model: nn.Module | None):
        self.spec = spec
        self.peft_model = peft_model

    def after_optimizer_step(self, step: int) -> None:
        if self.spec.kind == "adalora":
            self.peft_model.update_and_allocate(step)

    def state_dict(self) -> dict:
        """AdaLoRA's importance statistics and rank pattern: not in the model's state_dict,
        but needed for an exactly resumed run to prune the same singular values."""
        if self.spec.kind != "adalora":
            return {}
        allocator = self.peft_model.rankallocator
        pattern = self.peft_model.peft_config["default"].rank_pattern
        return {
            "ipt": dict(allocator.ipt),
            "exp_avg_ipt": dict(allocator.exp_avg_ipt),
            "exp_avg_unc": dict(allocator.exp_avg_unc),
            "rank_pattern": {k: [bool(x) for x in v] for k, v in (pattern or {}).items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if self.spec.kind != "adalora":
            return
        allocator = self.peft_model.rankallocator
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = dict(state["ipt"]), dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        self.peft_model.peft_config["default"].rank_pattern = dict(state["rank_pattern"]) or None

    def regularization(self) -> torch.Tensor | float:
        """AdaLoRA's orthogonality penalty on P and Q (mean Frobenius distance of PP^T, Q^TQ to I)."""
        if self.spec.kind != "adalora" or self.spec.orth_reg_weight == 0:
            return 0.0
        penalties = []
        for name, p in self.peft_model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                penalties.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
        return self.spec.orth_reg_weight * torch.stack(penalties).mean() if penalties else 0.0

    def rank_budget(self) -> int:
        """Total number of singular values still active (non-zero E entries) across adapted layers."""
        if self.spec.kind == "lora":
            return sum(self.spec.r for n, _ in self.peft_model.named_modules() if n.endswith(tuple(self.spec.target_modules)))
        if self.spec.kind != "adalora":
            return 0
        # Before the first allocation every module keeps init_r singular values; afterwards
        # peft's rank pattern says which ones survive (pruned ones are zeroed in E).
        pattern = self.peft_model.peft_config["default"].rank_pattern
        if not pattern:
            return self.spec.init_r * sum(1 for n, _ in self.peft_model.named_parameters() if "lora_E" in n)
        return int(sum(sum(bool(x) for x in mask) for mask in pattern.values()))


def apply_adapter(model: nn.Module, spec: AdapterSpec, trainable_extra: list[nn.Module] = ()) -> tuple[nn.Module, AdapterHandle]:
    """Adapt `model`'s encoder in place.

    kind=none trains every parameter that is not already frozen (full fine-tuning);
    lora/adalora freeze the base weights and add adapters on `target_modules`.
    `trainable_extra` (e.g. the CTC head, privacy masks) stays trainable in all cases.
    """
    if spec.kind == "none":
        return model, AdapterHandle(spec, None)
    from peft import AdaLoraConfig, AdaLoraModel, LoraConfig, LoraModel

    if spec.kind == "lora":
        config = LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, target_modules=spec.target_modules)
        wrapped = LoraModel(model, config, "default")
    elif spec.kind == "adalora":
        config = AdaLoraConfig(
            init_r=spec.init_r,
            target_r=spec.target_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=spec.target_modules,
            tinit=spec.tinit,
            tfinal=spec.tfinal,
            deltaT=spec.delta_t,
            beta1=spec.beta1,
            beta2=spec.beta2,
            orth_reg_weight=spec.orth_reg_weight,
            total_step=spec.total_step,
        )
        wrapped = AdaLoraModel(model, config, "default")
    else:
        raise ValueError(f"adapter.name={spec.kind!r}: expected one of none, lora, adalora")
    for module in trainable_extra:
        for p in module.parameters():
            p.requires_grad_(True)
    # peft injects the adapter layers into `model` itself; the wrapper is only
    # needed for AdaLoRA's rank allocation, so callers keep using `model`.
    return model, AdapterHandle(spec, wrapped)


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params/total": total, "params/trainable": trainable}
