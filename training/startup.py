"""Start-up checks: everything that can be known to fail before any data is loaded.

Every entry point runs them first, and a dry run (`dry_run=true`) runs exactly the
same checks, so "dry run: ... would run in ..." is printed only for settings that
would also start for real.

* option checks (conflicting options, impossible plans): `StartupError` in both modes;
* inputs an earlier step creates (the prepared corpus, the pretrained checkpoint, the
  fine-tuned model, the exported features): a real run stops with `MissingInputError`
  naming the path and the command that creates it; a dry run lists them as
  "needs ... (missing: <command>)" and succeeds, since a sweep is planned before its
  inputs exist.

`StartupError` is a `ValueError` (`MissingInputError` also a `FileNotFoundError`);
the entry scripts print it as one message without a traceback (training/cli.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ASR_TASKS = ("pretrain", "finetune", "evaluate", "export", "build_checkpoint")


class StartupError(ValueError):
    """A configuration that cannot run (the message names the options and what is expected)."""


class MissingInputError(StartupError, FileNotFoundError):
    """An input an earlier step creates does not exist (the message names the command that creates it)."""


@dataclass
class Plan:
    """What a start-up check found: inputs that are missing (a dry run reports them)."""

    missing: list[str] = field(default_factory=list)

    def need(self, path: str | Path, exists: bool, how: str) -> None:
        if not exists:
            self.missing.append(f"{path} not found: {how}")


def _corpus_ready(cfg: DictConfig) -> bool:
    from data.manifest import manifest_dir

    return (manifest_dir(cfg.data.dir) / "train.tsv").is_file()


def _prepare_command(cfg: DictConfig) -> str:
    return f"prepare the corpus first: python -m scripts.prepare_data data={cfg.data.name} <the same data overrides>"


def check_asr(cfg: DictConfig) -> Plan:
    """train_avhubert.py: option checks, then the inputs of cfg.task."""
    from training.config import check_choices

    check_choices(cfg)  # enum-like options first
    plan = Plan()
    if cfg.model.family == "wav2vec2" or cfg.federated.name != "none":
        from training.wav2vec2.plan import check_config, check_plan

        check_config(cfg)
        if _corpus_ready(cfg):
            check_plan(cfg)  # clients vs speakers and the DP budget need the manifest
        else:
            plan.need(cfg.data.dir, False, _prepare_command(cfg) + " (then the client and privacy-budget checks run too)")
        return plan
    if cfg.task not in ASR_TASKS:
        raise StartupError(f"task={cfg.task!r}: expected one of {', '.join(ASR_TASKS)} (data preparation is `python -m scripts.prepare_data`)")
    from training.avhubert.finetune import validate_options

    if not (cfg.get("asr_run") and cfg.task in ("evaluate", "export")):  # else the model is asr_run's, built from its saved config
        validate_options(cfg)
    plan.need(cfg.data.dir, _corpus_ready(cfg), _prepare_command(cfg))
    if cfg.task == "finetune" and cfg.model.checkpoint is not None:
        plan.need(cfg.model.checkpoint, Path(cfg.model.checkpoint).exists(),
                  "the shipped starting checkpoint is rebuilt by `make checkpoints`; a pretrained-only model of your own by "
                  f"python train_avhubert.py task=pretrain model={cfg.model.name} <the same data overrides>; or point "
                  "model.checkpoint at released weights")
    if cfg.task in ("evaluate", "export"):
        from training.avhubert.finetune import asr_run_dir

        model = asr_run_dir(cfg) / "finetune" / "model.pt"
        plan.need(model, model.is_file(),
                  f"asr_run={cfg.asr_run} holds no finished fine-tuning (finetune/model.pt)" if cfg.get("asr_run") else
                  "no finished fine-tuning for these overrides: python train_avhubert.py task=finetune <the same overrides>, "
                  "or point asr_run=<run dir> at the ASR run to use")
    if cfg.task in ("finetune", "evaluate") and cfg.eval.decoder == "beam":
        try:
            import flashlight.lib.text.decoder  # noqa: F401
        except ImportError as error:
            raise StartupError(f"eval.decoder=beam needs flashlight-text ({error}); pip install it or use eval.decoder=greedy") from None
    return plan


def check_attack(cfg: DictConfig) -> Plan:
    """train_speaker_verification.py: attacker options, the ASR run it attacks, and its export."""
    from models.rjca import RJCAConfig
    from training.avhubert.finetune import validate_options
    from training.attack import attack_stage_name

    from training.config import check_choices

    check_choices(cfg)
    plan = Plan()
    attack_stage_name(cfg)  # attacker.input / attacker.scenario
    a = OmegaConf.to_container(cfg.attacker, resolve=True)
    RJCAConfig.from_dict({**a, "input_kind": "raw" if a["input"] == "raw" else "features"})
    if a["max_nontarget_trials"] is not None and a["trials"] != "all_pairs":
        raise ValueError(f"attacker.max_nontarget_trials={a['max_nontarget_trials']} caps the generated pairs of "
                         f"attacker.trials=all_pairs; with attacker.trials={a['trials']} the trial list is read as is "
                         "(drop one of the two options)")
    if a["input"] == "raw":
        plan.need(cfg.data.dir, _corpus_ready(cfg), _prepare_command(cfg))
        return plan
    # The features come from the ASR run these overrides name: options that run could not
    # have been trained with mean there is nothing to attack. (With asr_run the model comes
    # from that run, built from the config its fine-tuning saved.)
    if not cfg.get("asr_run"):
        validate_options(cfg)
    export = Path(cfg.paths.run_dir) / "export"
    plan.need(export / "attacker_train.safetensors", (export / "attacker_train.safetensors").is_file(),
              "python train_avhubert.py task=finetune <the same overrides> (fine-tunes, evaluates and exports)")
    return plan


def run_checks(check, cfg: DictConfig) -> Plan:
    """Run a check; any ValueError / FileNotFoundError it raises becomes a StartupError."""
    from training.config import ConfigChoiceError

    try:
        return check(cfg)
    except (StartupError, ConfigChoiceError):  # already one clear message (cli.report_startup_errors prints both)
        raise
    except FileNotFoundError as error:
        raise MissingInputError(str(error)) from error
    except ValueError as error:
        raise StartupError(str(error)) from error


def enforce(plan: Plan) -> None:
    """A real run: the first missing input stops it."""
    if plan.missing:
        raise MissingInputError("; ".join(plan.missing))
