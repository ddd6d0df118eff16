"""The docs site builds, the README stays a front door, and the documented commands run as written.

`test_docs_build_strict`: `mkdocs build --strict` (mkdocs.yml at the repo root, pages in docs/) into
a temporary directory; strict mode with mkdocs.yml's `validation` settings fails on a page missing
from the nav, a broken link between pages and a missing anchor. Skips when mkdocs is not installed
(the docs extra, `pip install -e ".[docs]"`; CI installs it).

`test_readme_is_short`: README.md holds what the project is, the set-up, the first run, the map of
commands and the headline tables; the measured record lives in docs/. At most `README_MAX_LINES`.

The command checks read every fenced ```bash block of README.md and docs/**/*.md, as cheaply as
each kind of command allows, by these rules:

1. A line ending in a backslash continues on the next line. Each line is split into words as the
   shell does (quotes, backslash escapes, `# comments`) and into commands at `&&`, `||`, `;` and
   `|`; only commands whose first word is `python` or `python3` are checked.
2. A command is skipped when it holds a `<...>` placeholder (`outputs/runs/<date>/<time>`,
   `algo=<name>`) or a shell variable (an unescaped `$`): it is not runnable as written. Words such
   as `RUN/sft/model`, `DIR`, `SFTRM/...` or `/tmp/hh.jsonl` are paths that exist only after a run
   or on the reader's machine; composing a config does not open them, so those commands are
   still checked.
3. `python -m MODULE ...`: MODULE is importable (`importlib.util.find_spec`).
4. `python train.py OVERRIDES...`: the overrides compose against conf/ as `train.py` composes
   them (`compose_train` of conftest.py: the same config dir, schemas and `every_stage`
   handling), and the result passes what `train()` checks before its preflight opens any file: the
   plan (`algo`, `stage`) and every planned stage's settings parsed into its typed Config (unknown
   keys, bad values, a choice of parts that cannot run). Paths are not opened. `-m`/`--multirun` is
   dropped; a swept override (`lr=1e-4,3e-4`, `algo=ppo,grpo`) composes once per value, the other
   sweeps at their first value. A command that selects a config
   needing a Hydra plugin from an optional extra (`hydra/launcher=slurm` or `slurm_local`: the
   `slurm` extra; `sweep=optuna`: the `optuna` extra) is skipped when that plugin is not installed.
5. `python PATH.py ...` (another script): the file exists in the repository.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose_train

README_MAX_LINES = 250
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

# Configs that need a Hydra plugin from an optional extra: override -> the plugin's module.
PLUGIN_OVERRIDES = {
    "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=slurm_local": "hydra_plugins.hydra_submitit_launcher",
    "sweep=optuna": "hydra_plugins.hydra_optuna_sweeper",
}


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason='the docs extra is not installed: pip install -e ".[docs]"')
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_is_short():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move the record into docs/"


def _bash_lines(path: Path):
    """(line number, text) of every logical line in the file's ```bash blocks, continuations joined."""
    inside, pending, start = False, "", 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            inside = line.strip() in ("```bash", "```sh", "```shell")
            continue
        if not inside:
            continue
        if not pending:
            start = i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def _commands(line: str) -> list[list[str]]:
    """The line's commands as word lists, split as the shell would at && || ; | and &."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for word in lexer:
        if word in ("&&", "||", ";", "|", "&"):
            commands.append(words)
            words = []
        else:
            words.append(word.replace("\\$", "$"))  # bash: `\$` inside double quotes is a literal `$`
    return [c for c in commands + [words] if c]


def _documented_commands():
    """(id, raw line, words) of every python command in a ```bash block, placeholders skipped (rule 2)."""
    found = []
    for path in DOC_FILES:
        for lineno, line in _bash_lines(path):
            if re.search(r"<[^<>\s]+>", line) or re.search(r"(?<!\\)\$", line):
                continue
            for words in _commands(line):
                if words[0] not in ("python", "python3") or len(words) < 2:
                    continue
                found.append((f"{path.relative_to(REPO)}:{lineno}", line.strip(), words))
    return found


COMMANDS = _documented_commands()
MODULES = [c for c in COMMANDS if c[2][1] == "-m"]
TRAIN = [c for c in COMMANDS if c[2][1] == "train.py"]
SCRIPTS = [c for c in COMMANDS if c[2][1] not in ("-m", "train.py")]


def test_commands_were_found():
    # The extraction itself: the README's set-up block and the docs' examples are in the lists.
    assert any(w[:3] == ["python", "-m", "pytest"] for _, _, w in MODULES)
    assert any(w == ["python", "train.py"] for _, _, w in TRAIN)
    assert len(TRAIN) >= 30 and len(MODULES) >= 10


@pytest.mark.parametrize("where, line, words", MODULES, ids=[c[0] for c in MODULES])
def test_documented_module_is_importable(where, line, words):
    module = words[2]
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module!r} in `{line}`"


@pytest.mark.parametrize("where, line, words", SCRIPTS, ids=[c[0] for c in SCRIPTS])
def test_documented_script_exists(where, line, words):
    assert (REPO / words[1]).is_file(), f"{where}: no file {words[1]!r} in `{line}`"


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """One override list per value of each swept key, the other sweeps at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    first = [c[0] for c in choices]
    return [first] + [first[:k] + [v] + first[k + 1:] for k, c in enumerate(choices) for v in c[1:]]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


@pytest.mark.parametrize("where, line, words", TRAIN, ids=[c[0] for c in TRAIN])
def test_documented_train_command_composes(where, line, words, tmp_path):
    overrides = [w for w in words[2:] if w not in ("-m", "--multirun")]
    for override, module in PLUGIN_OVERRIDES.items():
        if override in overrides and not _installed(module):
            pytest.skip(f"{override} needs {module} (an optional extra), not installed")
    for variant in _sweep_variants(overrides):
        try:
            _plan(compose_train(tmp_path / "run", *variant))
        except Exception as e:  # noqa: BLE001 - the message names the override that failed
            pytest.fail(f"{where}: `{line}` does not compose ({' '.join(variant)}): {type(e).__name__}: {e}")


def _plan(cfg) -> list[str]:
    """What `train()` does with a composed config before its preflight opens any file: the task's reward,
    the plan, the root settings, and every planned stage's settings parsed into its typed Config."""
    from rlhf.training.plan import apply_root_settings, apply_task_reward, plan_stages, stage_config

    apply_task_reward(cfg)
    plan = plan_stages(cfg)
    apply_root_settings(cfg)
    for stage in plan:
        stage_config(cfg, stage)
    return plan
