"""The flat run config shared by ServerApp and ClientApp.

Flower passes a flat ``run_config`` (``[tool.flwr.app.config]`` in
privacy/federated/pyproject.toml, overridable with ``flwr run --run-config``;
or the dict given to :func:`privacy.federated.runner.run_federated`). Keys use
Flower's hyphen style. :data:`DEFAULT_RUN_CONFIG` is the Flower app's source of
truth (pyproject.toml repeats it; a test checks they agree). The Hydra side
derives a run config from the composed config in training/wav2vec2/run_config.py,
the only place that knows both.
"""

from __future__ import annotations

from typing import Any, Mapping

from privacy.federated.compression import COMPRESSIONS, TOPK_VALUE_BITS

DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "task": "privacy.federated.task:tiny_synthetic_task",
    "seed": 0,
    "num-clients": 2,
    "num-rounds": 2,
    "strategy": "fedavg",  # fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg | krum
    "fraction-train": 1.0,
    "cohort-sampling": "fixed",  # fixed: Flower's fraction-train sampling | poisson: each client joins a round with probability cohort-rate
    "cohort-rate": 1.0,  # poisson: q, the per-round probability of every client (user-level DP is accounted at this rate)
    "fraction-evaluate": 1.0,
    "min-train-nodes": 2,
    "proximal-mu": 0.01,
    "trimmed-beta": 0.2,
    "krum-malicious": -1,  # krum: f, the number of malicious clients tolerated; must be set (>= 1)
    "server-lr": 0.1,  # fedadam eta
    "server-beta1": 0.9,  # fedadam: the server Adam's first-moment decay (Reddi et al. 2021; Flower's FedAdam default)
    "server-beta2": 0.99,  # fedadam: second-moment decay
    "server-tau": 1e-3,  # fedadam: the adaptivity floor tau added to sqrt(second moment)
    "fedavg-server-lr": 1.0,  # cohort-sampling=poisson: the server applies fedavg-server-lr x (server-momentum buffer of the mean update)
    "server-momentum": 0.0,  # cohort-sampling=poisson: FedAvgM momentum beta (0 = plain FedAvg); under DP both act on the noised mean
    "public-subspace-dim": 0,  # cohort-sampling=poisson: k > 0 projects every client update onto k directions of public gradients (public_subspace.py)
    "public-subspace-refresh": 1,  # rounds between two public-gradient bases (recomputed at the current global model)
    "public-subspace-split": "public",  # the task's split of PUBLIC speakers the basis is computed from
    "ema": 0.0,  # beta in (0, 1): the server scores and returns the bias-corrected EMA of its global models per round (post-processing), the centralised baseline that of its parameters per step; 0: the last one
    "server-shrink": 0.0,  # kappa > 0: under central DP with Poisson cohorts the server step is shrunk per coordinate by its optimiser buffer's DP noise variance (PoissonCohortFedAvg); 0: off
    "server-adam-bc": 0.0,  # rho in (0, 1]: fedadam under central DP with Poisson cohorts: the second moment minus the DP noise variance, floored at (rho x noise std)^2 (DP-AdamBC); 0: off
    "lr-decay": "none",  # none | linear: the server step (cohort-sampling=poisson) or the centralised baseline's optimiser decays to 1/T at its last step
    "local-epochs": 1,
    "local-steps": 0,  # > 0: exactly this many local steps instead of epochs
    "lr": 0.05,
    "local-optimizer": "sgd",  # sgd | adam (a fresh optimiser every round)
    "batch-size": 16,
    "device": "auto",  # trainer.device: where each client trains (common.device.resolve_device)
    "compression": "none",  # none | int8 | topk
    "topk-fraction": 0.05,
    "topk-keep-biases": False,  # every 1-d parameter (biases) sent in full; top-k picks among the others
    "topk-value-bits": 16,  # 16: fp16 values + 16-bit indices | 8 / 4: int8 / int4 values + a bitmask of the kept positions
    "error-feedback": True,
    "int8-block-size": 0,  # 0: one scale per tensor
    "dp": "none",  # none | local | central
    "target-epsilon": 8.0,
    "target-delta": 1e-5,
    "max-grad-norm": 1.0,
    "clipping-norm": 1.0,
    "noise-multiplier": -1.0,  # < 0: derived from the budget
    "dp-accountant": "rdp",  # rdp | prv: local DP, and central DP with cohort-sampling=poisson (fixed cohorts: Flower's RDP accountant)
    "dp-poisson-sampling": True,  # local DP: must stay true (the accounting assumes Poisson sampling)
    "dp-max-noise-multiplier": 1.0e3,  # a plan needing more noise is rejected
    "dp-unit": "auto",  # privacy unit: auto | utterance (dp=local) | client (dp=central) | speaker (dp=central, one speaker per client)
    "dp-reproducible-noise-NOT-PRIVATE": False,  # True: DP noise + Poisson sampling seeded from the run seed. NOT PRIVATE
    "server-eval-split": "",  # a split the SERVER scores the global model on after every round (test speakers; no client data); "" = off
    "server-eval-every": 1,  # the server scores every n-th round (and the last); long runs of cheap rounds set n > 1
    "client-evaluation": "auto",  # auto (on without DP, off under DP) | on | off: federated evaluation on clients' held-out data
    "max-num-examples": 0,  # > 0: the largest num-examples a client may claim (fedavg / fedprox / fedadam without DP)
    "max-update-norm": 1.0e6,
    "round-timeout": 3600.0,
    "checkpoint-every": 1,  # the server writes <run-dir>/server_checkpoint.npz after every n-th round (and the last); 0: never (server_checkpoint.py)
    "resume": True,  # a run started in a run-dir holding a checkpoint of the same configuration continues after its round
    "run-dir": "",
}

LOCAL_OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")


def resolve_run_config(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults, then each layer on top (later wins). Unknown keys are an error (typos must not become defaults)."""
    merged = dict(DEFAULT_RUN_CONFIG)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in DEFAULT_RUN_CONFIG and not key.startswith(("tiny-", "task-")):
                raise KeyError(f"unknown federated run_config key {key!r}; known keys: {sorted(DEFAULT_RUN_CONFIG)}")
            merged[key] = value
    if merged["strategy"] not in STRATEGIES:
        raise ValueError(f"run_config['strategy']={merged['strategy']!r}; expected one of {STRATEGIES}")
    if merged["local-optimizer"] not in LOCAL_OPTIMIZERS:
        raise ValueError(f"run_config['local-optimizer']={merged['local-optimizer']!r}; expected one of {LOCAL_OPTIMIZERS}")
    if merged["dp"] not in ("none", "local", "central"):
        raise ValueError(f"run_config['dp']={merged['dp']!r}; expected none | local | central")
    if merged["cohort-sampling"] not in ("fixed", "poisson"):
        raise ValueError(f"run_config['cohort-sampling']={merged['cohort-sampling']!r}; expected fixed | poisson")
    if not 0 < float(merged["cohort-rate"]) <= 1:
        raise ValueError(f"run_config['cohort-rate']={merged['cohort-rate']!r}; must be in (0, 1] (the probability of each client per round)")
    if merged["lr-decay"] not in ("none", "linear"):
        raise ValueError(f"run_config['lr-decay'] (federated.lr_decay)={merged['lr-decay']!r}; expected none | linear")
    ema = merged["ema"]
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= float(ema) < 1:
        raise ValueError(f"run_config['ema'] (federated.ema)={ema!r}; expected a decay in [0, 1) "
                         "(0: the run returns its last model)")
    shrink = merged["server-shrink"]
    if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 <= float(shrink) <= 10:
        raise ValueError(f"run_config['server-shrink'] (federated.server_shrink)={shrink!r}; expected a number in [0, 10] "
                         "(0: off, 1: the Wiener / positive-part James-Stein factor)")
    if float(shrink) and not (merged["dp"] == "central" and merged["cohort-sampling"] == "poisson"
                              and merged["strategy"] in ("fedavg", "fedadam") and int(merged["public-subspace-dim"]) == 0):
        raise ValueError(f"run_config['server-shrink'] (federated.server_shrink)={shrink}: shrinks the DP noise of the server step "
                         f"of Poisson cohorts (dp=central, cohort-sampling=poisson, strategy=fedavg|fedadam, no public subspace); "
                         f"got dp={merged['dp']} cohort-sampling={merged['cohort-sampling']} strategy={merged['strategy']} "
                         f"public-subspace-dim={merged['public-subspace-dim']}")
    rho = merged["server-adam-bc"]
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= float(rho) <= 1:
        raise ValueError(f"run_config['server-adam-bc'] (federated.server_adam_bc)={rho!r}; expected a floor in [0, 1] "
                         "(0: off; the fraction of the DP noise std below which a coordinate's scale is not trusted)")
    if float(rho) and not (merged["dp"] == "central" and merged["cohort-sampling"] == "poisson"
                           and merged["strategy"] == "fedadam" and int(merged["public-subspace-dim"]) == 0):
        raise ValueError(f"run_config['server-adam-bc'] (federated.server_adam_bc)={rho}: debiases the server Adam's second moment "
                         f"for the DP noise of Poisson cohorts (dp=central, cohort-sampling=poisson, strategy=fedadam, no public "
                         f"subspace); got dp={merged['dp']} cohort-sampling={merged['cohort-sampling']} strategy={merged['strategy']} "
                         f"public-subspace-dim={merged['public-subspace-dim']}")
    every = merged["server-eval-every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"run_config['server-eval-every'] (federated.server_eval_every)={every!r}; expected an integer >= 1 "
                         "(the server scores the global model every n-th round and the last)")
    for key, field, ok, expected in (("server-lr", "server_lr", lambda v: v > 0, "> 0"),
                                     ("server-beta1", "server_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
                                     ("server-beta2", "server_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
                                     ("server-tau", "server_tau", lambda v: v > 0, "> 0")):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
            raise ValueError(f"run_config['{key}'] (federated.{field})={value!r}; expected a number {expected} (fedadam's server step)")
    for key, field, low in (("public-subspace-dim", "public_subspace_dim", 0), ("public-subspace-refresh", "public_subspace_refresh", 1)):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"run_config['{key}'] (federated.{field})={value!r}; expected an integer >= {low}")
    _check_dp_options(merged)
    if merged["compression"] not in COMPRESSIONS:
        raise ValueError(f"run_config['compression']={merged['compression']!r}; expected {' | '.join(COMPRESSIONS)}")
    if merged["topk-value-bits"] not in TOPK_VALUE_BITS or isinstance(merged["topk-value-bits"], bool):
        raise ValueError(f"run_config['topk-value-bits'] (compression.topk_value_bits)={merged['topk-value-bits']!r}; "
                         "expected 16 (fp16 values), 8 or 4 (int8 / int4 values + a bitmask)")
    fraction = merged["topk-fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < float(fraction) <= 1:
        raise ValueError(f"run_config['topk-fraction'] (compression.topk_fraction)={fraction!r}; expected a number in (0, 1]")
    if merged["client-evaluation"] not in ("auto", "on", "off"):
        raise ValueError(f"run_config['client-evaluation']={merged['client-evaluation']!r}; expected auto | on | off")
    return merged


DP_UNITS = ("utterance", "client", "speaker")


def _check_dp_options(cfg: dict[str, Any]) -> None:
    """Every DP option either reaches the clients or is rejected here, naming the key and why ("auto" unit resolved in place)."""
    if cfg["dp-accountant"] not in ("rdp", "prv"):
        raise ValueError(f"run_config['dp-accountant']={cfg['dp-accountant']!r}; expected rdp | prv")
    if cfg["dp-unit"] == "auto":
        cfg["dp-unit"] = {"local": "utterance", "central": "client"}.get(cfg["dp"], "auto")
    if cfg["dp-unit"] not in DP_UNITS + (("auto",) if cfg["dp"] == "none" else ()):
        raise ValueError(f"run_config['dp-unit']={cfg['dp-unit']!r}; expected auto or one of {DP_UNITS}")
    if not float(cfg["dp-max-noise-multiplier"]) > 0:
        raise ValueError(f"run_config['dp-max-noise-multiplier']={cfg['dp-max-noise-multiplier']!r}; must be > 0")
    if cfg["dp"] == "local":
        if not bool(cfg["dp-poisson-sampling"]):
            raise ValueError(
                "run_config['dp-poisson-sampling']=False with dp=local: the accountant's subsampling amplification assumes "
                "Poisson sampling; shuffled fixed-size batches would make the reported epsilon wrong"
            )
        if cfg["dp-unit"] != "utterance":
            raise ValueError(
                f"run_config['dp-unit']={cfg['dp-unit']!r} with dp=local: local DP-SGD protects one utterance; speaker-level "
                f"DP is dp=central with one client per speaker (dp.unit=speaker)"
            )
    if cfg["dp"] == "central" and cfg["dp-unit"] not in ("client", "speaker"):
        raise ValueError(
            f"run_config['dp-unit']={cfg['dp-unit']!r} with dp=central: central DP protects a whole client's data "
            f"(client), or one speaker when every client holds exactly one speaker (speaker)"
        )
    if cfg["dp"] == "central" and cfg["dp-accountant"] != "rdp" and cfg["cohort-sampling"] != "poisson":
        raise ValueError(
            f"run_config['dp-accountant']={cfg['dp-accountant']!r} with dp=central and cohort-sampling="
            f"{cfg['cohort-sampling']!r}: fixed cohorts are accounted with Flower's RDP accountant only; use rdp, or "
            f"cohort-sampling=poisson (PoissonCohortFedAvg accounts with Opacus' rdp or prv)"
        )
    if cfg["dp"] == "none" and bool(cfg["dp-reproducible-noise-NOT-PRIVATE"]):
        raise ValueError("run_config['dp-reproducible-noise-NOT-PRIVATE']=True with dp=none: there is no DP noise to make reproducible")


def client_evaluation_enabled(cfg: Mapping[str, Any]) -> bool:
    """Federated evaluation on the clients' held-out (private) utterances: a release outside the DP guarantee,
    so under DP it runs only when asked for ("on")."""
    if cfg["client-evaluation"] == "auto":
        return cfg["dp"] == "none"
    return cfg["client-evaluation"] == "on"


def not_private(cfg: Mapping[str, Any]) -> bool:
    """True when the run's DP noise can be regenerated from its configuration (the reproducible option)."""
    return cfg["dp"] != "none" and bool(cfg["dp-reproducible-noise-NOT-PRIVATE"])
