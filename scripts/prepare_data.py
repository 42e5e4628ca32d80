"""`python -m scripts.prepare_data data=<corpus> [overrides]`: prepare a corpus into `data.dir`.

Same primary config as the entry scripts (conf/config.yaml); the work is
:func:`data.prepare.prepare`. Unless `hydra.run.dir` is given on the command
line, Hydra's own files go to `<data.dir>/prepare/.hydra`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import training.config  # noqa: F401  (registers the structured-config schemas and resolvers)
from data.prepare import prepare
from training.cli import hydra_argv


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    training.config.check_choices(cfg)  # enum-like options (data.on_error, data.tokenizer, ...) before any work
    prepare(cfg)


def _default_hydra_dir(argv: list[str]) -> list[str]:
    # conf/hydra/default.yaml puts Hydra's files in the training run dir; a corpus is
    # not a training run, so keep them with the corpus unless the user chose a place.
    if any(a.startswith(("hydra.run.dir=", "+hydra.run.dir=", "-m", "--multirun")) for a in argv[1:]):
        return argv
    return [*argv, "hydra.run.dir=${data.dir}/prepare/.hydra"]


if __name__ == "__main__":
    sys.argv = hydra_argv(_default_hydra_dir(sys.argv))
    main()
