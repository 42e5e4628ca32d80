"""What the entry scripts share around `@hydra.main`: argument order and start-up errors.

    if __name__ == "__main__":
        sys.argv = hydra_argv(sys.argv)
        main()

and the task function body runs inside `report_startup_errors`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from training.config import ConfigChoiceError
from training.startup import StartupError

log = logging.getLogger(__name__)

# Hydra's options that take a value (the next argument unless given as --opt=value).
VALUE_OPTIONS = ("-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                 "--experimental-rerun")
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def hydra_argv(argv: list[str]) -> list[str]:
    """Hydra's options first, then the overrides, each group in the order given.

    Hydra's argparse takes the overrides as one positional list, so an override after
    an option (`train_avhubert.py dry_run=true -m masks=a,b`, `... --cfg job seed=2`)
    was an "unrecognized arguments" error; overrides are order-free, so options may
    go anywhere.
    """
    options: list[str] = []
    overrides: list[str] = []
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            overrides += args[i + 1:]
            break
        if not arg.startswith("-"):
            overrides.append(arg)
        else:
            options.append(arg)
            takes_value = arg in VALUE_OPTIONS or (arg in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in INFO_CHOICES)
            if takes_value and i + 1 < len(args):
                options.append(args[i + 1])
                i += 1
        i += 1
    return [argv[0], *options, *overrides]


@contextlib.contextmanager
def report_startup_errors() -> Iterator[None]:
    """A configuration that cannot run ends with one clear message and exit status 2, no traceback.

    `HYDRA_FULL_ERROR=1` re-raises it, so Hydra prints the whole traceback (as for any other error).
    Errors after start-up are not caught here: they keep their tracebacks.
    """
    try:
        yield
    except (StartupError, ConfigChoiceError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s\n(configuration error, nothing was run; set HYDRA_FULL_ERROR=1 for the traceback)", error)
        raise SystemExit(2) from None
