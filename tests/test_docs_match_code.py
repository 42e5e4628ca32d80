"""The docs say what the code does, where a machine can check it cheaply:

* every repository path a doc or docstring cites (`docs/results.md`, `training/attack.py`, ...) exists;
* every `python -m <module>` it shows names a module that exists;
* every `--flag` a script's docstring shows is accepted by that script's argument parser;
* `--help` lists the config groups a user can choose, and not the internal `schema` group.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import PROJECT_ROOT

TOP_LEVEL = sorted(p.name for p in PROJECT_ROOT.iterdir() if not p.name.startswith(".") and p.name not in ("runs", "datasets"))
DOCS = [PROJECT_ROOT / "README.md", PROJECT_ROOT / "data" / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
SOURCES = sorted(p for d in ("common", "data", "models", "privacy", "training", "scripts", "benchmarks", "conf")
                 for p in (PROJECT_ROOT / d).rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)
SOURCES += sorted(PROJECT_ROOT.glob("*.py"))

# a path made of word characters, dots and slashes, ending in a file extension we ship
PATH = re.compile(r"(?<![\w/.${<*-])((?:[\w.-]+/)*[\w.-]+\.(?:py|md|yaml|toml|txt|png|json|cfg))(?![\w/*{}<>-])")
MODULE = re.compile(r"python -m ([\w.]+)")


def _cited_paths(text: str) -> set[str]:
    """Repository paths cited in a text: relative paths whose first part is a top-level entry of the repo."""
    cited = set()
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".")
        first = path.split("/", 1)[0]
        if "/" in path and first in TOP_LEVEL:
            cited.add(path)
        elif "/" not in path and (path in TOP_LEVEL or re.fullmatch(r"[A-Z_]+\.md", path)):
            cited.add(path)  # a top-level file, or a bare project document name (README.md, DESIGN.md)
    return cited


def _exists(path: str, relative_to: Path) -> bool:
    return (PROJECT_ROOT / path).exists() or (relative_to / path).exists()


def _ours(path: str, relative_to: Path) -> bool:
    """A citation of this repository: its folder exists here (`conf/finetune/base_lrs3_30h.yaml` in a
    comment about av_hubert's recipe names another project's file)."""
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    return (PROJECT_ROOT / parent).is_dir() or (relative_to / parent).is_dir()


def _module_exists(module: str) -> bool:
    """A project module must be a file here; another one (torch.distributed.run, pip) must be importable."""
    if module.split(".")[0] in TOP_LEVEL:
        base = PROJECT_ROOT / module.replace(".", "/")
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return importlib.util.find_spec(module.split(".")[0]) is not None


@pytest.mark.parametrize("doc", [*DOCS, *SOURCES], ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_cited_files_and_modules_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = sorted(p for p in _cited_paths(text) if _ours(p, doc.parent) and not _exists(p, doc.parent))
    assert not missing, f"{doc.relative_to(PROJECT_ROOT)} cites files that do not exist: {missing}"
    modules = sorted({m.rstrip(".") for m in MODULE.findall(text)})
    absent = [m for m in modules if not _module_exists(m)]
    assert not absent, f"{doc.relative_to(PROJECT_ROOT)} shows `python -m` with modules that do not exist: {absent}"


def test_the_path_scanner_finds_what_it_should():
    text = "see `docs/results.md`, training/attack.py, DESIGN.md; not runs/x.json, <run_dir>/metrics.json or config.yaml"
    assert _cited_paths(text) == {"docs/results.md", "training/attack.py", "DESIGN.md"}
    assert not _exists("DESIGN.md", PROJECT_ROOT / "docs") and _ours("DESIGN.md", PROJECT_ROOT / "docs")
    assert _ours("training/federated.py", PROJECT_ROOT) and not _exists("training/federated.py", PROJECT_ROOT)  # moved: caught
    assert not _ours("conf/finetune/base_lrs3_30h.yaml", PROJECT_ROOT)  # another project's file
    assert not _module_exists("data.prepare_corpus") and _module_exists("scripts.make_tables") and _module_exists("torch.distributed.run")


ARGPARSE_SCRIPTS = ["scripts.make_tables", "scripts.demo", "scripts.optuna_sweep", "benchmarks.run"]


@pytest.mark.parametrize("module", ARGPARSE_SCRIPTS)
def test_flags_in_a_script_docstring_exist(module):
    path = PROJECT_ROOT / (module.replace(".", "/") + ".py")
    source = path.read_text()
    docstring = re.match(r'\s*(?:#.*\n)*\s*"""(.*?)"""', source, re.S)
    flags = sorted(set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", docstring.group(1) if docstring else "")))
    if "argparse" not in source:
        assert not flags, f"{module}: its docstring shows {flags} but it has no argument parser"
        return
    help_text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                               timeout=120).stdout
    unknown = [f for f in flags if f not in help_text and f != "--help"]
    assert not unknown, f"{module}'s docstring shows {unknown}, which `python -m {module} --help` does not accept"


def test_help_lists_the_choosable_groups_not_the_schema(capsys):
    out = subprocess.run([sys.executable, "train_avhubert.py", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=120).stdout
    groups = dict(line.split(": ", 1) for line in out.split("== Configuration groups ==")[1].split("== Config ==")[0].splitlines()
                  if ": " in line and not line.startswith("Compose"))
    expected = {p.name for p in (PROJECT_ROOT / "conf").iterdir() if p.is_dir() and p.name not in ("hydra", "schema")}
    assert set(groups) == expected
    assert "schema" not in groups
    assert "both" in groups["masks"].split(", ")


def test_demo_rebuild_runs_the_makefile_checkpoints_recipe():
    """`python -m scripts.demo --rebuild-checkpoint` says it regenerates the shipped checkpoints "the
    way `make checkpoints` does": both run the same commands, in the same order."""
    from scripts.demo import REBUILD_STEPS

    makefile = (PROJECT_ROOT / "Makefile").read_text().splitlines()
    start = makefile.index(next(line for line in makefile if line.startswith("checkpoints:"))) + 1
    recipe = []
    for line in makefile[start:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().split())
    assert recipe and all(cmd[0] == "$(PY)" for cmd in recipe), recipe
    assert [cmd[1:] for cmd in recipe] == [args for _, args in REBUILD_STEPS]


def test_readme_demo_commands_are_the_demo_steps():
    """The README's list of what `make demo` runs is scripts/demo.py's STEPS (and make_tables), in order."""
    import re

    from scripts.demo import STEPS

    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("`make demo` runs, with progress bars, exactly these commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    readme = [re.split(r"\s+#", line.strip(), maxsplit=1)[0].strip() for line in block.splitlines() if line.strip()]
    expected = [" ".join(["python", *args]) for _, args in STEPS] + ["python -m scripts.make_tables"]
    assert readme == expected


def test_demo_protected_is_the_demo_with_the_front_setting():
    """experiment=demo_protected composes exactly the config (and run directory) of experiment=demo with
    the front setting's seven overrides, so its runs meet the ones made with the overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        short = compose("config", overrides=["experiment=demo_protected"])
        long = compose("config", overrides=["experiment=demo", "masks=both", "masks.noise_granularity=utterance",
                                            "masks.init_scale=1.0", "loss=ctc_contrastive", "loss.projection=none",
                                            "loss.negatives=protected", "loss.adversary_weight=0.5"])
    assert OmegaConf.to_container(short, resolve=True) == OmegaConf.to_container(long, resolve=True)
    assert short.paths.run_dir.endswith("avhubert_tiny-adalora-both-s1.0-utt-cl0.1-t0.1-pnone-nprotected-adv0.5/s1")
