"""Third-party warnings and log lines that are expected here: filtered, each explained once.

    quiet_third_party()      # once per process, before the libraries log anything

What is filtered, and why it is expected in this project:

* Opacus "Secure RNG turned off": DP noise comes from torch's default generator, so
  runs are reproducible; `privacy.dp` documents where the secure generator is used.
* Opacus "Optimal order is the largest alpha": the RDP accountant's best order is the
  largest in its list (small noise, large epsilon); the epsilon it reports stays a valid,
  possibly loose, upper bound (docs/results_fl_dp.md cross-checks it independently).
* torch "Full backward hook is firing when gradients are computed with respect to
  module outputs": Opacus' per-sample hooks on a first trainable layer whose inputs
  come from frozen layers; the per-sample gradients are still exact.
* absl (dp_accounting) "... failed to converge ... Excluding this order": the
  independent RDP cross-check drops Rényi orders its series cannot evaluate; the
  remaining orders give a valid (upper-bound) epsilon (docs/results_fl_dp.md).
* Flower's own console handler: Flower's records also reach the root logger (Hydra's
  console and log file), so every Flower line was printed twice; the extra handler is
  removed when the root logger has handlers.
* transformers' and huggingface_hub's progress bars ("Loading weights", "Writing model
  shards"): carriage-return noise in log files. The wav2vec2 "LOAD REPORT" table is
  replaced by one line in `models.wav2vec2.build_wav2vec2_ctc`.

The first time a filtered message occurs, one INFO line says what it was and why it
is harmless (`explained`); a message that is not on the list is never touched.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

log = logging.getLogger(__name__)

# (category, message regex, module regex or "", the one-line explanation)
EXPECTED_WARNINGS = [
    (UserWarning, r"Secure RNG turned off", r"opacus",
     "Opacus secure_mode is off: DP noise from torch's pseudo-random generator (fine for experiments, not for a deployment)"),
    (UserWarning, r"Optimal order is the largest alpha", r"opacus",
     "Opacus' RDP accountant: the best Renyi order is the largest it tries (small noise / large epsilon); "
     "the epsilon it reports is still a valid, possibly loose, upper bound"),
    (UserWarning, r"Full backward hook is firing when gradients are computed with respect to module outputs", r"",
     "torch: Opacus' per-sample hooks on a layer whose inputs come from frozen layers (per-sample gradients stay exact)"),
]
# (logger name, message regex, the one-line explanation)
EXPECTED_LOG_LINES = [
    ("absl", r"failed to converge .* Excluding this order",
     "dp_accounting: some Renyi orders did not converge and were left out; epsilon from the other orders is still an upper bound"),
]

_explained: set[str] = set()
_installed = False


def explained(key: str, explanation: str) -> None:
    """Log `explanation` the first time `key` is seen in this process."""
    if key not in _explained:
        _explained.add(key)
        log.info("expected third-party message (shown once, then filtered): %s", explanation)


class _ExpectedLines(logging.Filter):
    def __init__(self, patterns: list[tuple[re.Pattern, str]]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for pattern, explanation in self.patterns:
            if pattern.search(message):
                explained(pattern.pattern, explanation)
                return False
        return True


def _showwarning_with_explanations(original):
    compiled = [(cat, re.compile(msg), re.compile(mod) if mod else None, why) for cat, msg, mod, why in EXPECTED_WARNINGS]

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        for cat, msg, mod, why in compiled:
            if issubclass(category, cat) and msg.search(text) and (mod is None or mod.search(filename)):
                explained(msg.pattern, why)
                return
        original(message, category, filename, lineno, file, line)

    showwarning.__wrapped__ = original
    return showwarning


def quiet_third_party() -> None:
    """Install the filters above (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = _showwarning_with_explanations(warnings.showwarning)
    for name in {name for name, _, _ in EXPECTED_LOG_LINES}:
        patterns = [(re.compile(p), why) for n, p, why in EXPECTED_LOG_LINES if n == name]
        logging.getLogger(name).addFilter(_ExpectedLines(patterns))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if "flwr" in sys.modules:
        dedupe_flower_logs()


def dedupe_flower_logs() -> None:
    """Flower logs through its own console handler AND propagates to the root logger: under Hydra
    (root handlers for console and file) every line appeared twice. Keep the root's copy.
    Imports flwr: call it where Flower is about to run (training/wav2vec2/finetune.py)."""
    if not logging.getLogger().handlers:
        return
    try:
        from flwr.common.logger import FLOWER_LOGGER
    except ImportError:
        return
    for handler in list(FLOWER_LOGGER.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            FLOWER_LOGGER.removeHandler(handler)
    FLOWER_LOGGER.setLevel(logging.INFO)
