"""Every `python ...` line of the README's code blocks runs, as a dry run, on the defaults.

A dry run performs every start-up check a real run does (training/startup.py), so a
documented command that would stop at start-up (conflicting options, an unknown
group, a flag argparse rejects) fails this test. Inputs an earlier step creates
(the corpus, the pretrained model, the export) may be missing: a dry run lists them.

The commands run in this process (runpy with a patched argv: what `python script.py`
and `python -m module` do, `if __name__ == "__main__"` included), with
`paths.root_dir` pointed at a temporary directory: nothing is written to the repository.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from training.config import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
HYDRA_SCRIPTS = {"train_avhubert.py": "train_avhubert", "train_speaker_verification.py": "train_speaker_verification"}


def readme_python_commands(text: str) -> list[str]:
    """The `python ...` lines of the ```bash blocks, without their trailing comments."""
    commands, in_block = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```bash" if not in_block else False
            continue
        if in_block and line.strip().startswith("python "):
            commands.append(re.split(r"\s+#", line.strip(), maxsplit=1)[0].strip())
    return commands


def _placeholders(args: list[str], tmp: Path) -> list[str]:
    """`key=...` (the user fills it in) -> a value that exists."""
    return [a.replace("=...", f"={tmp / 'placeholder'}") if a.endswith("=...") else a for a in args]


def _run_main(target: str, args: list[str]) -> int:
    """`python <target> args` (a script path) or `python -m <target> args` (a module), in this process."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    old = sys.argv
    try:
        if target.endswith(".py"):
            sys.argv = [str(PROJECT_ROOT / target), *args]
            runpy.run_path(str(PROJECT_ROOT / target), run_name="__main__")
        else:
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=False)
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()


def run_as_dry_run(command: str, tmp: Path) -> tuple[int, str]:
    """Run one README command the way a dry run would; returns (exit status, what it was run as)."""
    words = _placeholders(shlex.split(command)[1:], tmp)
    if words[:2] == ["-m", "scripts.make_tables"]:
        # argparse, no dry run: read an empty runs directory, write to a temporary one
        runs = tmp / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        args = [*words[2:], "--runs-dir", str(runs), "--out", str(tmp / "tables")]
        return _run_main("scripts.make_tables", args), f"scripts.make_tables {args}"
    if words[:2] == ["-m", "scripts.rescore"]:  # argparse: its own --dry-run lists the runs and the missing corpus
        args = [*words[2:], "--runs-dir", str(tmp / "runs"), "--dry-run"]
        return _run_main("scripts.rescore", args), f"scripts.rescore {args}"
    if words[0] == "-m":
        target, args = words[1], words[2:]
    elif words[0].endswith(".py") and (PROJECT_ROOT / words[0]).is_file():
        target, args = words[0], words[1:]
    else:
        raise AssertionError(f"README command {command!r}: no rule to dry-run it (add one to tests/test_readme_commands.py)")
    if any(a.startswith("hydra/launcher=") for a in args):
        # A launcher plugin would submit the jobs (SLURM): check that its config composes,
        # then dry-run the sweep with the basic launcher.
        composed = [a for a in args if a not in ("-m", "--multirun")]
        status = _run_main(target, [*composed, "--cfg", "hydra", f"paths.root_dir={tmp}"])
        if status:
            return status, f"{target} --cfg hydra {args}"
        args = [a for a in args if not a.startswith(("hydra/launcher=", "hydra.launcher."))]
    args = [*args, "dry_run=true", f"paths.root_dir={tmp}"]
    return _run_main(target, args), f"{target} {args}"


COMMANDS = readme_python_commands(README.read_text())


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 10, COMMANDS
    assert any(c.startswith("python train_speaker_verification.py") for c in COMMANDS)
    assert any(" -m " in f" {c} " and "dry_run=true" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_passes_its_dry_run(command, tmp_path, capsys):
    import torch

    status, ran = run_as_dry_run(command, tmp_path)
    out = capsys.readouterr()
    if "cuda" in command and not torch.cuda.is_available():
        # a GPU command on a machine without one: its start-up check must say so, in one message
        assert status == 2 and "no usable CUDA device" in out.out + out.err, out.out[-2000:] + out.err[-2000:]
        return
    assert status == 0, f"`{command}` (run as {ran}) exited with {status}:\n{out.out[-3000:]}\n{out.err[-3000:]}"
    if "--cfg" not in command and "make_tables" not in command:
        assert "dry run:" in out.out, f"`{command}` printed no dry-run plan:\n{out.out[-2000:]}"


def test_a_command_that_would_fail_at_start_up_fails_its_dry_run(tmp_path, capsys):
    """The check has teeth: the README's first sweep line with the old bucket sampler is rejected."""
    status, _ = run_as_dry_run("python train_avhubert.py masks=additive loss=ctc_contrastive trainer.sampler=bucket", tmp_path)
    assert status == 2
    status, _ = run_as_dry_run("python train_speaker_verification.py masks=both loss=ctc_contrastive trainer.sampler=bucket", tmp_path)
    assert status == 2
    assert "dry run:" not in capsys.readouterr().out


def test_dry_run_before_or_after_multirun_flag(tmp_path, capsys):
    for order in (["dry_run=true", "-m", "masks=additive,both"], ["-m", "dry_run=true", "masks=additive,both"]):
        status = _run_main("train_avhubert.py", [*order, f"paths.root_dir={tmp_path}"])
        assert status == 0
        assert capsys.readouterr().out.count("dry run: finetune would run in") == 2
