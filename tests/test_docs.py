"""The docs cannot drift from the code: every fenced shell command in README.md and docs/ (and
every command in a tool's docstring) that runs `python tools/...` (also under torchrun) or `make`
names a tool, flags, config keys and targets that exist (argparse tools: their --help; Hydra
tools: the overrides compose; make: the Makefile); every run folder the docs name is one that a
documented command or the Makefile creates; every figure has a results page."""
import ast
import contextlib
import fnmatch
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


def docstring_commands(source: str):
    """The command lines of a tool's module docstring (indented lines starting with python,
    python3 or torchrun; continuations joined)."""
    doc = ast.get_docstring(ast.parse(source)) or ""
    lines = [line.strip() for line in doc.replace("\\\n", " ").splitlines()]
    text = "\n".join(line for line in lines if re.match(r"(python3?|torchrun|make)\b", line))
    return shell_commands(f"```bash\n{text}\n```")


TOOLS = sorted((ROOT / "tools").glob("*.py"))


def documented():
    out = []
    sources = [(doc, doc.read_text(), shell_commands) for doc in DOCS]
    sources += [(tool, tool.read_text(), docstring_commands) for tool in TOOLS]
    for doc, text, commands in sources:
        for cmd in commands(text):
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
        makefile = (ROOT / "Makefile").read_text()
        targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
        variables = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", makefile, re.M))
        for t in cmd[1:]:
            if "=" in t:
                assert t.split("=")[0] in variables, f"make variable {t!r} is not set in the Makefile"
            else:
                assert t.startswith("-") or t in targets, f"make target {t!r} is not in the Makefile"
        return
    i = next(i for i, t in enumerate(cmd) if TOOL.match(t))
    tool, args = ROOT / cmd[i].lstrip("./"), cmd[i + 1:]
    shown = placeholders(args)
    assert not shown, f"placeholders {shown} in a runnable command: write a real value, or the option on a comment line"
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


def placeholders(args: list[str]) -> list[str]:
    """Arguments that stand for something to fill in (``[--json out.json]``, ``...``, ``<dir>``)
    rather than run; a Hydra list value (``key=[1,3]``) is a real value."""
    return [a for a in args if "..." in a or a.startswith(("[", "<")) or (a.endswith("]") and "[" not in a)
            or (a.endswith(">") and "<" in a)]


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 60 and {d.name for d, _ in COMMANDS} >= {"README.md", "real_data.md", "serve.md"}


@pytest.mark.parametrize("doc,cmd", COMMANDS, ids=[f"{d.relative_to(ROOT)}:{' '.join(c)[:60]}" for d, c in COMMANDS])
def test_documented_command_matches_the_code(doc, cmd):
    check_command(cmd)


def test_the_check_catches_drift():
    for bad in (["python", "tools/train.py", "train.stepz=3"], ["python", "tools/predict.py", "--no-such-flag"],
                ["python", "tools/summarize_runs.py", "runs/a", "[--json", "summary.json]"],
                ["python", "tools/train.py", "experiment=synthetic", "..."],
                ["python", "tools/train.py", "experiment=synthetic", "[data.max_train_images=256"],
                ["make", "tset"], ["make", "demo", "SEEDS=1"], ["python", "tools/nope.py"], ["python", "tools/train.py", "experiment=unreal"]):
        with pytest.raises(Exception):
            check_command(bad)


VENV = re.compile(r"source \.venv/bin/activate|\.venv/bin/python")


def needs_a_venv_word(doc: Path, text: str) -> bool:
    """A page that runs ``python tools/...`` without saying where that python comes from (a fresh
    shell after ``make demo`` has no environment active)."""
    runs_python = any(cmd[0] in ("python", "python3", "torchrun") for cmd in shell_commands(text))
    return runs_python and not VENV.search(text)


def test_every_page_with_python_commands_says_which_environment_runs_them():
    assert [str(d.relative_to(ROOT)) for d in DOCS if needs_a_venv_word(d, d.read_text())] == []
    readme = (ROOT / "README.md").read_text()
    first_python = min(readme.find("\npython tools/"), readme.find("python tools/"))
    assert 0 <= readme.find("source .venv/bin/activate") < readme.find("\npython tools/"), \
        "README: activate the environment before the first python command"
    assert first_python >= 0


def test_the_environment_check_catches_a_page_that_assumes_one():
    bare = "```bash\npython tools/train.py experiment=synthetic\n```\n"
    assert needs_a_venv_word(Path("x.md"), bare)
    assert not needs_a_venv_word(Path("x.md"), "Run `source .venv/bin/activate` first.\n" + bare)
    assert not needs_a_venv_word(Path("x.md"), "```bash\nmake demo\n```\n")


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


# ---------------------------------------------------------------- figures and their sources
RESULTS = ROOT / "docs" / "results"
# A measured figure: a decimal, a percentage, a ratio (1.14x) or a duration / size with its unit.
FIGURE = re.compile(r"(?<![\w.\-/])(\d+(?:\.\d+)?(?:%|x\b| ?(?:ms|min|s|GB)\b)|\d+\.\d+)(?![\w.]*\d)")
# Words of a working log that a reader of the docs cannot decode.
WORKING_WORDS = re.compile(r"\b(this stop|this session|issue \d+|was lent|earlier session|issue target)\b", re.I)


def sections(text: str) -> list[str]:
    """The README's ``## `` sections (the text before the first one included), Install left out."""
    parts = re.split(r"^(?=## )", text, flags=re.M)
    return [p for p in parts if not p.startswith("## Install")]


def untraced(text: str, pages: dict[str, str]) -> list[str]:
    """Figures of each README section that no docs/results page linked from that section holds."""
    out = []
    for section in sections(text):
        linked = "\n".join(body for name, body in pages.items() if f"docs/results/{name}" in section)
        for line in section.splitlines():
            out += [f"{m.group(1)!r} in: {line.strip()[:100]}" for m in FIGURE.finditer(line)
                    if m.group(1) not in linked]
    return out


def results_pages() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(RESULTS.glob("*.md"))}


def test_every_readme_figure_is_in_a_results_page_its_section_links():
    readme = (ROOT / "README.md").read_text()
    assert sum(len(FIGURE.findall(s)) for s in sections(readme)) > 20
    assert untraced(readme, results_pages()) == []


def test_the_figure_check_catches_a_figure_without_a_source():
    pages = {"demo.md": "| cls | top-1 | 92.8 |\n`make demo` took 11 min 05 s; 1.14x; 65%"}
    good = "## Results\n| cls | 92.8 |\nabout 11 min, 1.14x and 65% ([log](docs/results/demo.md))\n"
    assert untraced(good, pages) == []
    bad = "## Results\n| cls | 93.8 |\n~12 min, 1.2x, 66% ([log](docs/results/demo.md))\n## Speed\n1.14x\n"
    assert [u.split(" in:")[0] for u in untraced(bad, pages)] == ["'93.8'", "'12 min'", "'1.2x'", "'66%'", "'1.14x'"]


def test_every_results_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in RESULTS.glob("*.md"):
        assert f"docs/results/{page.name}" in readme, f"README does not link docs/results/{page.name}"


def test_docs_speak_plainly():
    for doc in DOCS:
        found = WORKING_WORDS.findall(doc.read_text())
        assert not found, f"{doc.relative_to(ROOT)} uses working words a reader cannot decode: {found}"


# ---------------------------------------------------------------- run folders
RUN_NAME = re.compile(r"(?<![\w.])runs/([\w.+\-<>*${}()]+)")
PLACEHOLDER = re.compile(r"<[^>]*>|\$+\([^)]*\)|\$+\{[^}]*\}|\$+\w+|\*+")


def _pattern(name: str) -> str:
    """A run folder's name with its placeholders (``<stamp>``, ``$(SEED)``, ``$s``, ``*``) as ``*``."""
    return PLACEHOLDER.sub("*", name.split("/")[0]).rstrip(".")


def _default_output_dir(cmd: list[str]) -> str | None:
    """Where a Hydra training tool writes when the command sets no ``output_dir``."""
    i = next(i for i, t in enumerate(cmd) if TOOL.match(t))
    if Path(cmd[i]).name not in ("train.py", "pretrain.py") or any(t.startswith("output_dir=") for t in cmd):
        return None
    from hydra import compose, initialize_config_dir
    args = cmd[i + 1:]
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return str(compose("train", overrides=overrides).output_dir)


def created_run_folders(commands) -> set[str]:
    """Patterns of the run folders that the Makefile or a documented command creates."""
    makefile = (ROOT / "Makefile").read_text()
    made = {_pattern(m) for m in re.findall(r"runs/([^\s;'\")|]+)", makefile)}
    made |= {_pattern(m) for m in re.findall(r"\$\(call latest,[^,]+,([^)]+)\)", makefile)}
    for _, cmd in commands:
        if cmd[0] == "make":
            continue
        for i, tok in enumerate(cmd):
            value = tok.split("=", 1)[1] if tok.split("=")[0] in ("output_dir", "eval.out") else \
                (cmd[i + 1] if tok in ("--out", "--runs") and i + 1 < len(cmd) else "")
            made |= {_pattern(m) for m in RUN_NAME.findall(value)}
        default = _default_output_dir(cmd)
        made |= {_pattern(m) for m in RUN_NAME.findall(default or "")}
    return made


def named_run_folders() -> list[tuple[str, str]]:
    """(where, run folder name) for every ``runs/NAME`` in the docs and the tools' docstrings."""
    texts = [(str(d.relative_to(ROOT)), d.read_text()) for d in DOCS]
    texts += [(str(t.relative_to(ROOT)), ast.get_docstring(ast.parse(t.read_text())) or "") for t in TOOLS]
    return [(where, name) for where, text in texts for name in RUN_NAME.findall(text)]


def uncreated(named, made) -> list[str]:
    out = []
    for where, name in named:
        p = _pattern(name)
        if p and not any(fnmatch.fnmatchcase(p, m) or fnmatch.fnmatchcase(m, p) for m in made):
            out.append(f"{where}: runs/{name}")
    return sorted(set(out))


def test_every_run_folder_the_docs_name_is_created_by_a_documented_command():
    made = created_run_folders(COMMANDS)
    assert {"synthetic", "pretrain_glid"} <= made
    assert uncreated(named_run_folders(), made) == []


def test_the_run_folder_check_catches_a_folder_nothing_creates():
    made = {"synthetic", "synthetic-s*-*", "seg_glid_s*"}
    named = [("a.md", "synthetic/model.safetensors"), ("a.md", "synthetic-s0-20261204-234928"),
             ("a.md", "synthetic-<stamp>"), ("a.md", "seg_glid_s*"), ("b.md", "demo1"), ("b.md", "dense_cls")]
    assert uncreated(named, made) == ["b.md: runs/demo1", "b.md: runs/dense_cls"]


# ---------------------------------------------------------------- figures in the topic pages
CITED = re.compile(r"et al\.")
WORDED_MULTIPLE = re.compile(r"\b(?:two|three|four|five|six|seven|eight|nine|ten|twenty|fifty|a hundred|hundred)"
                             r"(?:fold|\s+times)\b", re.I)


def untraced_in_page(text: str, pages: dict[str, str]) -> list[str]:
    """Figures in a docs page's prose that no results page linked from it holds. Settings,
    thresholds and versions are written as code (`0.75`) and fenced blocks are commands, so both
    are left out; a line that names its published source (``et al.``) quotes it."""
    linked = "\n".join(body for name, body in pages.items() if f"results/{name}" in text)
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
    found = [f"{m.group(1)!r} in: {line.strip()[:100]}" for line in prose.splitlines() if not CITED.search(line)
             for m in FIGURE.finditer(line) if m.group(1) not in linked]
    # A multiple in words ("ten times slower") rounds a measured ratio where nobody can check it
    # against the results page: write the measured figure.
    found += [f"{m.group(0)!r} in words: {line.strip()[:100]}" for line in prose.splitlines()
              if not CITED.search(line) for m in WORDED_MULTIPLE.finditer(line)]
    return found


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_figure_of_a_topic_page_is_in_a_results_page_it_links(page):
    assert untraced_in_page(page.read_text(), results_pages()) == []


def test_the_page_check_catches_a_measured_figure_without_a_source():
    pages = {"x.md": "| step | 1.07 s |"}
    good = "Measured: 1.07 s per step ([log](results/x.md)); mask ratio `0.75`.\nDeiT-S: 79.8 (Touvron et al.)"
    assert untraced_in_page(good, pages) == []
    assert [u.split(" in:")[0] for u in untraced_in_page(good.replace("1.07 s", "1.2 s"), pages)] == ["'1.2 s'"]
    assert untraced_in_page("about 8 minutes on an H100 (~3.5 min)", pages) == ["'3.5 min' in: about 8 minutes on an H100 (~3.5 min)"]
    assert untraced_in_page("about ten times slower than scipy ([log](results/x.md))", pages) == [
        "'ten times' in words: about ten times slower than scipy ([log](results/x.md))"]
