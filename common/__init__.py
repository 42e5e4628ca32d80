"""The ground floor: helpers every package uses and that import none of the project's packages.

    common.files     atomic file writes, `metrics.json` and `config.yaml` of a stage
    common.seeding   seeding Python, NumPy and torch
    common.skips     counting items skipped under `data.on_error=skip`
    common.metrics   WER / CER and speaker-verification metrics (EER, minDCF, DET)
    common.device    `trainer.device` resolved to a torch.device; batches moved there

Imports run downwards only (scripts -> training -> privacy -> models / data -> common);
tests/test_import_direction.py checks it.
"""
