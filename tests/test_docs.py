"""The command lines and links in README.md and docs/*.md keep working.

Every command line in the pages' code blocks is found (every line of a ```bash block; in an
untagged or ```text block, the lines that start with a command word such as `python` or `qlora`)
and classified by the first rule of RULES that matches it. A RUN rule runs the line here, on a
CPU, in a temporary working directory, under a timeout, and expects exit status 0; a SKIP rule
names why the line cannot run here. A line that no rule matches fails the test, so a new command
in the docs cannot slip by unclassified.

Lines that are not run are still checked where that is cheap: the Hydra overrides of every
training line (`python train.py`, `qlora train`, `torchrun ... train.py`) are composed against
recipes/ and checked like a run checks them before anything loads, and the key=value options of
every other `qlora <command>` line are checked against that command's options. A renamed recipe
key or command option in the docs fails here. Every relative link must point to a file (and
heading) that exists.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Code blocks whose every line is a command, and blocks where only lines starting with a command
# word are (an untagged block may hold a file tree or output).
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
PLAIN_BLOCKS = {"", "text"}
COMMAND_WORDS = {"python", "python3", "qlora", "qlora-demo", "pytest", "torchrun", "accelerate", "pip", "cd",
                 "wandb"}

# The embedded default, cut to seconds: 2 optimizer steps of 2 examples, no exact-match passes (one
# greedy generation per held-out prompt, before and after), one eval batch, no samples in the log,
# one checkpoint at the end (trainer fields in qlora/train/schema.py; the preset is
# recipes/trainer/embedded.yaml). Keys a doc line sets itself are replaced by these.
SHORT_RUN = ["trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.exact_match_examples=0",
             "trainer.eval_batches=1", "trainer.eval_samples=0", "trainer.save_every=0"]

# No line run here may reach the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "offline"}

# Values the reader fills in: the line cannot run as written.
PLACEHOLDER = re.compile(r"<[^>]+>|\.\.\.|\b(?:PATH|DIR|HOST)\b|/abs/path/to/")


@dataclass
class Command:
    text: str  # the line as written, continuation lines joined
    env: dict  # leading NAME=value assignments
    argv: list  # the words after them, comments removed
    where: list = field(default_factory=list)  # "docs/page.md:12" for each place it appears

    @property
    def words(self) -> str:
        return " ".join(self.argv)

    @property
    def qlora_command(self) -> str | None:
        """`export` for `qlora export ...`; `""` for a bare `qlora` or `qlora --help`."""
        if not self.argv or self.argv[0] != "qlora":
            return None
        return self.argv[1] if len(self.argv) > 1 and not self.argv[1].startswith("-") else ""

    @property
    def training_overrides(self) -> list | None:
        """The Hydra overrides of a training line (`python train.py`, `qlora train`, a launcher running
        train.py), flags such as `--cfg job` and bare `...` left out; None for any other line."""
        argv = self.argv
        if self.qlora_command == "train":
            rest = argv[2:]
        elif argv[:1] in (["python"], ["python3"]) and argv[1:2] == ["train.py"]:
            rest = argv[2:]
        elif argv[:1] in (["torchrun"], ["accelerate"]) and "train.py" in argv:
            rest = argv[argv.index("train.py") + 1:]
        else:
            return None
        overrides, skip_value = [], False
        for word in rest:
            if skip_value:
                skip_value = False
            elif word in ("--cfg", "-c", "--package", "-p"):
                skip_value = True
            elif not word.startswith("-") and word != "...":
                overrides.append(word)
        return overrides

    @property
    def is_training(self) -> bool:
        return self.training_overrides is not None and self.argv[0] not in ("torchrun", "accelerate")


def _split_env(words: list) -> tuple[dict, list]:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        name, value = words[0].split("=", 1)
        env[name] = value
        words = words[1:]
    return env, words


def _command_lines(page: Path):
    """(line number, text) of each command line in the page's code blocks."""
    lines = page.read_text(encoding="utf-8").splitlines()
    fence, lang, pending, start = None, None, "", 0
    for number, line in enumerate(lines, 1):
        opening = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None:
            if opening:
                fence, lang = opening.group(1), opening.group(2).lower()
            continue
        if line.strip().startswith(fence):
            fence = None
            continue
        if lang not in SHELL_BLOCKS | PLAIN_BLOCKS:
            continue
        text = line.strip()
        if pending:
            text, pending = pending + " " + text, ""
        else:
            start = number
        if text.endswith("\\"):
            pending = text[:-1].rstrip()
            continue
        if not text or text.startswith("#"):
            continue
        if lang in PLAIN_BLOCKS:
            _, words = _split_env(text.split())
            if not words or words[0] not in COMMAND_WORDS:
                continue
        yield start, text


def collect_commands() -> list[Command]:
    """Every command line of every page, identical lines merged (each keeps all its places)."""
    found: dict[str, Command] = {}
    for page in PAGES:
        for number, text in _command_lines(page):
            words = shlex.split(text, comments=True)
            env, argv = _split_env(words)
            key = " ".join(words)
            if key not in found:
                found[key] = Command(text=text, env=env, argv=argv)
            found[key].where.append(f"{page.relative_to(ROOT)}:{number}")
    return list(found.values())


def _hub_data(command: Command) -> bool:
    """A `data=<preset>` whose source is not the embedded task (and no local data.source given)."""
    overrides = command.training_overrides or []
    if any(o.startswith("data.source=") for o in overrides):
        return False
    for override in overrides:
        if override.startswith("data="):
            preset = ROOT / "recipes" / "data" / (override.split("=", 1)[1] + ".yaml")
            source = re.search(r"^source:\s*(\S+)", preset.read_text(), re.M) if preset.exists() else None
            if source is None or source.group(1) != "embedded":
                return True
    return False


def _other_model(command: Command) -> bool:
    """A preset or model other than the embedded default: downloaded from the Hub, sized for a GPU."""
    return any(re.match(r"(recipe|model)=(?!embedded$)", o) or o.startswith("model.name_or_path=")
               for o in command.training_overrides or [])


RUN, SKIP = "run", "skip"


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    reason: str
    matches: Callable[[Command], bool]
    timeout_s: int = 0  # RUN rules: the longest the line may take here


# First match wins. A RUN rule's lines are executed by test_command_runs.
RULES = [
    Rule("installs", SKIP, "changes the Python environment (pip, venv); CI runs the quick-start install itself",
         lambda c: bool(re.search(r"(^|[\s/])pip3? (install|freeze)\b|-m venv\b", c.words))),
    Rule("test-suite", SKIP, "runs the test suite, this file included; CI runs it",
         lambda c: "pytest" in c.argv or any(w.endswith("/pytest") for w in c.argv)),
    Rule("placeholder", SKIP, "holds a value the reader fills in (<run>, ..., PATH, DIR, HOST, /abs/path/to/)",
         lambda c: bool(PLACEHOLDER.search(c.words))),
    Rule("several-processes", SKIP, "starts several processes through a launcher (torchrun, accelerate launch), "
                                    "sized for GPUs; its overrides are composed by test_training_overrides_compose",
         lambda c: c.argv[0] in ("torchrun", "accelerate")),
    Rule("print-config", RUN, "`--cfg job` composes the recipe and prints it; nothing loads",
         lambda c: c.is_training and "--cfg" in c.argv, timeout_s=180),
    Rule("help", RUN, "`--help` prints the usage and exits",
         lambda c: "--help" in c.argv, timeout_s=180),
    Rule("benchmark", SKIP, "a benchmark script: minutes to hours, a GPU or the peers it measures; it writes "
                            "benchmarks/results/",
         lambda c: any(w.startswith("benchmarks/") for w in c.argv)),
    Rule("hub-model", SKIP, "trains a model downloaded from the Hub (7B and up) on a GPU; its overrides are "
                            "composed by test_training_overrides_compose",
         lambda c: c.is_training and _other_model(c)),
    Rule("hub-data", SKIP, "downloads its training data from the Hub; its overrides are composed by "
                           "test_training_overrides_compose",
         lambda c: c.is_training and _hub_data(c)),
    Rule("loftq", SKIP, "LoftQ's SVD of every layer per iteration makes even a 2-step run take 20-40 s on 2 "
                        "cores; tests/test_loftq.py covers it, and its overrides are composed",
         lambda c: c.is_training and "lora.init=loftq" in (c.training_overrides or [])),
    Rule("embedded-training", RUN, "trains the embedded default on the CPU, cut to 2 steps by SHORT_RUN",
         lambda c: c.is_training, timeout_s=420),
    Rule("doctor", SKIP, "checks and times every kernel path: minutes without a GPU, and writes a report file",
         lambda c: c.qlora_command == "doctor"),
    Rule("eval-tasks", SKIP, "lm-evaluation-harness tasks (an optional extra) download their data from the Hub",
         lambda c: c.qlora_command == "eval" and any(w.startswith("tasks=") for w in c.argv)),
]


def classify(command: Command) -> Rule | None:
    return next((rule for rule in RULES if rule.matches(command)), None)


COMMANDS = collect_commands()
RUNNABLE = [(c, rule) for c in COMMANDS if (rule := classify(c)) is not None and rule.action == RUN]


def test_every_command_line_is_classified():
    assert len(COMMANDS) >= 20, f"only {len(COMMANDS)} command lines found: is the extraction broken?"
    unclassified = [f"{', '.join(c.where)}: {c.text}" for c in COMMANDS if classify(c) is None]
    assert not unclassified, ("command lines no rule of RULES in tests/test_docs.py classifies (add a rule "
                              "that runs them, or one that names why they cannot run here):\n"
                              + "\n".join(unclassified))


def _argv_here(command: Command, rule: Rule) -> list:
    """The line as this interpreter runs it: `python` is sys.executable, train.py the repository's,
    `qlora` the console script beside sys.executable (or `python -m qlora.cli`)."""
    argv = list(command.argv)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
        if argv[1:2] == ["train.py"]:
            argv[1] = str(ROOT / "train.py")
    elif argv[0] == "qlora":
        script = Path(sys.executable).with_name("qlora")
        argv[:1] = [str(script)] if script.exists() else [sys.executable, "-m", "qlora.cli"]
    if rule.name == "embedded-training":
        short_keys = {o.split("=", 1)[0] for o in SHORT_RUN}
        argv = [w for w in argv if w.lstrip("+~").split("=", 1)[0] not in short_keys] + SHORT_RUN
    return argv


@pytest.mark.parametrize("command, rule", RUNNABLE, ids=[c.where[0] for c, _ in RUNNABLE])
def test_command_runs(command, rule, tmp_path):
    argv = _argv_here(command, rule)
    env = {**os.environ, **OFFLINE_ENV, **command.env}
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=rule.timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command.text!r} ({', '.join(command.where)}) ran past {rule.timeout_s} s")
    output = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, (f"{command.text!r} ({', '.join(command.where)}) exited with status "
                                  f"{done.returncode}:\n{output}")


def test_training_overrides_compose():
    """Every training line's overrides compose against recipes/ and pass the checks a run makes before
    anything loads (unknown keys, `_target_` signatures and ranges), whether or not it runs here."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qlora.train.recipe_checks import check_targets, check_unknown_keys
    from qlora.train.schema import register

    register()
    GlobalHydra.instance().clear()  # another test may have left Hydra initialized
    lines = [c for c in COMMANDS if c.training_overrides is not None]
    assert lines, "no training lines found"
    failures = []
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        for command in lines:
            overrides = command.training_overrides
            if any(o.startswith("hydra.searchpath=") for o in overrides):
                continue  # names a recipe folder the reader has (/abs/path/to/my_recipes)
            try:
                cfg = compose(config_name="config", overrides=overrides)
                check_unknown_keys(cfg)
                check_targets(cfg)
            except Exception as err:  # noqa: BLE001 - every failure is reported with its line
                failures.append(f"{', '.join(command.where)}: {command.text}\n    {type(err).__name__}: {err}")
    assert not failures, "training lines whose overrides do not compose:\n" + "\n".join(failures)


def test_qlora_command_options_exist():
    """Every key of a `qlora <command> key=value ...` line is an option of that command, under its
    current name (a deprecated spelling fails too), and the options the command requires are given."""
    from qlora.cli import COMMANDS as CLI_COMMANDS
    from qlora.cli import RENAMED_KEYS

    failures = []
    for command in COMMANDS:
        name = command.qlora_command
        if not name or name == "train":
            continue  # `qlora --help`; `qlora train` is checked by test_training_overrides_compose
        if name not in CLI_COMMANDS:
            failures.append(f"{', '.join(command.where)}: unknown command {name!r}")
            continue
        options = CLI_COMMANDS[name][0]
        given = {w.strip("[]").split("=", 1)[0] for w in command.argv[2:] if "=" in w}
        if "--help" not in command.argv:
            missing = [k for k, (_, text) in options.items() if text.startswith("required") and k not in given]
            if missing:
                failures.append(f"{', '.join(command.where)}: qlora {name} needs {', '.join(missing)}")
        for word in command.argv[2:]:
            key = word.strip("[]").split("=", 1)[0]
            if "=" not in word or word.startswith("-"):
                continue
            if key in RENAMED_KEYS.get(name, {}):
                failures.append(f"{', '.join(command.where)}: `{key}=` is the deprecated spelling of "
                                f"`{RENAMED_KEYS[name][key]}=`")
            elif key not in options:
                failures.append(f"{', '.join(command.where)}: qlora {name} has no option {key!r}")
    assert not failures, "\n".join(failures)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_relative_links_exist():
    failures = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)  # code blocks
        text = re.sub(r"`[^`\n]*`", "", text)  # inline code
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not resolved.exists():
                failures.append(f"{where} points to a file that does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                failures.append(f"{where}: {resolved.name} has no heading with the anchor #{anchor}")
    assert not failures, "\n".join(failures)
