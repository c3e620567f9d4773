"""The docs cannot drift from the code: every fenced shell command in README.md and docs/ that runs
`python tools/...` (also under torchrun) or `make` names a tool, flags, config keys and targets
that exist (argparse tools: their --help; Hydra tools: the overrides compose; make: the Makefile)."""
import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
TOOL = re.compile(r"^(?:\./)?tools/[\w]+\.py$")


def shell_commands(text: str):
    """Each command of each fenced shell block: continuations joined, comments dropped, split at
    ``&&``, ``||`` and ``;``."""
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            command: list[str] = []
            for tok in tokens + [";"]:
                if tok in ("&&", "||", ";", "|"):
                    if command:
                        yield command
                    command = []
                else:
                    command.append(tok)


def documented():
    out = []
    for doc in DOCS:
        for cmd in shell_commands(doc.read_text()):
            while cmd and re.match(r"^[A-Z_]+=", cmd[0]):  # VAR=value prefixes
                cmd = cmd[1:]
            if not cmd:
                continue
            if cmd[0] == "make":
                out.append((doc, cmd))
            elif cmd[0] in ("python", "python3", "torchrun") and any(TOOL.match(t) for t in cmd):
                out.append((doc, cmd))
    return out


COMMANDS = documented()


def _help(tool: Path) -> str:
    argv, out = sys.argv, io.StringIO()
    sys.argv = [str(tool), "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_path(str(tool), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


_HELP: dict[Path, str] = {}


def check_command(cmd: list[str]) -> None:
    if cmd[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        for t in cmd[1:]:
            assert t.startswith("-") or t in targets, f"make target {t!r} is not in the Makefile"
        return
    i = next(i for i, t in enumerate(cmd) if TOOL.match(t))
    tool, args = ROOT / cmd[i].lstrip("./"), [a.strip("[]") for a in cmd[i + 1:] if a not in ("...", "[", "]")]
    assert tool.is_file(), f"{cmd[i]} does not exist"
    source = tool.read_text()
    if "@hydra.main" in source:
        from hydra import compose, initialize_config_dir
        name = re.search(r'config_name="(\w+)"', source).group(1)
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            compose(name, overrides=overrides)  # an unknown key, group or option raises
        return
    if tool not in _HELP:
        _HELP[tool] = _help(tool)
    flags = {a.split("=")[0] for a in args if a.startswith("--")}
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", _HELP[tool]), \
            f"{cmd[i]} has no option {flag} (see its --help)"


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 60 and {d.name for d, _ in COMMANDS} >= {"README.md", "real_data.md", "serve.md"}


@pytest.mark.parametrize("doc,cmd", COMMANDS, ids=[f"{d.relative_to(ROOT)}:{' '.join(c)[:60]}" for d, c in COMMANDS])
def test_documented_command_matches_the_code(doc, cmd):
    check_command(cmd)


def test_the_check_catches_drift():
    for bad in (["python", "tools/train.py", "train.stepz=3"], ["python", "tools/predict.py", "--no-such-flag"],
                ["make", "tset"], ["python", "tools/nope.py"], ["python", "tools/train.py", "experiment=unreal"]):
        with pytest.raises(Exception):
            check_command(bad)


def test_every_docs_page_is_linked_from_the_readme_or_another_page():
    text = "\n".join(p.read_text() for p in DOCS)
    for page in (ROOT / "docs").rglob("*.md"):
        assert page.name in text.replace(page.read_text(), ""), f"{page.relative_to(ROOT)} is linked from nowhere"


def test_relative_links_and_pictures_exist():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"
