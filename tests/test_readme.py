"""Every command the README shows is checked against the real thing, so a command or option that
does not exist fails here.

* Shell lines (```sh blocks and indented blocks, ``\\``-continued lines joined): each ``stylequeue``
  line is parsed by the real parser (``shared.cli.build_parser``), ``make`` targets and variables
  must be in the Makefile, ``python SCRIPT`` must exist (``deploy/demo.py``'s options are parsed),
  ``source`` names the Makefile's venv; programs that start servers or need a GPU are in
  ``NOT_RUN`` with the reason they are only checked, and an unknown path-like program fails.
* Inline mentions (`` `stylequeue tenants set-limits T --weight N` ``): the command, its subcommand and
  every option must exist (placeholders are not parsed); a span of options alone (`` `--size
  --min-size ...` ``) belongs to the nearest command of its paragraph.
* Cheap ones run: ``.venv/bin/stylequeue --help`` as a process, and ``--help`` of every command the
  README names.
"""

from __future__ import annotations

import argparse
import io
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from deploy.demo import build_parser as demo_parser
from shared.cli import build_parser, command_of, main
from tests.support import REPO

README = (REPO / "README.md").read_text()
MAKEFILE = (REPO / "Makefile").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL_LANGS = {"sh", "bash", "shell", "console"}  # an unlabelled fence is the architecture drawing
STYLEQUEUE = {"stylequeue", ".venv/bin/stylequeue"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
NOT_RUN = {  # program -> why a README line running it is only checked here, never run
    "curl": "needs a running API (tests/api/test_events.py streams the same route)",
    "docker": "starts containers: `make deploy-test` runs the stack (tests/deploy parses the files)",
    "kubectl": "needs a cluster (tests/deploy/test_k8s.py renders and validates the manifests)",
    "pg_ctlcluster": "starts the PostgreSQL server the tests use",
    "redis-server": "starts the Redis server the tests use",
    "celery": "starts a Celery worker (tests/worker run the task)",
    "nvidia-cuda-mps-control": "needs a GPU",
}
BENCH_REASON = "benchmarks run for minutes to an hour: their files are checked, not run"


def _shell_lines(text: str) -> list[str]:
    """The lines of shell blocks, continuation lines joined."""
    raw: list[str] = []
    for match in FENCE.finditer(text):
        if match.group(1) in SHELL_LANGS:
            raw += match.group(2).splitlines()
    block = False
    for line in FENCE.sub("", text).splitlines():  # indented blocks: 4+ spaces after a blank line
        block = bool(line.strip()) and line.startswith("    ") and (block or not raw or raw[-1] == "")
        raw.append(line.strip() if block else "")
    joined: list[str] = []
    for line in raw:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line
        elif line:
            joined.append(line)
    return joined


def _words(line: str) -> list[str]:
    """A shell line's words, without a ``$`` prompt, comments and leading VAR=value assignments."""
    text = line[2:] if line.startswith("$ ") else line
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return []
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words.pop(0)
    return words


def _spans() -> list[tuple[int, list[str]]]:
    """Inline code spans outside fences: (paragraph number, words)."""
    out = []
    for number, paragraph in enumerate(re.split(r"\n\s*\n", FENCE.sub("", README))):
        out += [(number, span.split()) for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`", paragraph)]
    return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_names(words: list[str], flags: Sequence[str] = ()) -> list[str]:
    """``stylequeue WORDS``: the command path it names (checked), and each option in it or in
    ``flags`` checked against the parsers of that path."""
    words = [w.strip("[]") for w in words]  # the README's [optional] notation
    parser = build_parser(command_of(words))
    chain, path = [parser], []
    for word in words:
        sub = _subcommands(chain[-1])
        if not word.startswith("-") and sub:
            assert word in sub, f"`stylequeue {' '.join(words)}`: no command {word!r} (has {sorted(sub)})"
            chain.append(sub[word])
            path.append(word)
    known = {opt for p in chain for opt in p._option_string_actions}
    for flag in [w.split("=")[0] for w in [*words, *flags] if re.fullmatch(r"--?[a-zA-Z][\w-]*(=.*)?", w)]:
        assert flag in known, f"`stylequeue {' '.join(words)}`: no option {flag}"
    return path


def parse_fully(argv: list[str]) -> None:
    """A whole README command line, parsed as ``stylequeue`` would parse it."""
    argv = [w.strip("[]") for w in argv]
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            build_parser(command_of(argv)).parse_args(argv)
        except SystemExit as done:  # 0: a --help line, which ran
            if done.code != 0:
                pytest.fail(f"`stylequeue {' '.join(argv)}` does not parse: {err.getvalue().strip()}")


def _make_names() -> tuple[set[str], set[str]]:
    targets = set(re.findall(r"^([\w.-]+):", MAKEFILE, re.M))
    variables = set(re.findall(r"^(\w+)\s*[?:]?=", MAKEFILE, re.M))
    return targets, variables


def check_line(words: list[str]) -> str:
    """Check one shell command; returns how (for the count of what was checked)."""
    program, args = words[0], words[1:]
    if program in STYLEQUEUE:
        parse_fully(args)
        check_names(args)
        return "parsed"
    if program == "make":
        targets, variables = _make_names()
        for arg in args:
            name, is_var, _ = arg.partition("=")
            assert (name in variables) if is_var else (name in targets), f"`make {' '.join(args)}`: {arg}"
        return "make"
    if program in PYTHONS:
        script = REPO / args[0]
        assert script.is_file(), f"`{' '.join(words)}`: no {args[0]}"
        if args[0] == "deploy/demo.py":
            demo_parser().parse_args(args[1:])
            return "parsed"
        assert args[0].startswith("bench/"), f"`{' '.join(words)}`: say why it is not run"
        return BENCH_REASON
    if program == "source":
        venv = re.search(r"^VENV\s*\?=\s*(\S+)", MAKEFILE, re.M)
        assert venv and args == [f"{venv.group(1)}/bin/activate"], words
        return "venv"
    if program in NOT_RUN:
        return NOT_RUN[program]
    assert "/" not in program or "(" in program, f"`{' '.join(words)}`: an unknown program"
    return "not a command"


SHELL = [w for w in map(_words, _shell_lines(README)) if w]
NAMED = sorted(
    {tuple(check_names(w[1:])) for w in SHELL if w[0] in STYLEQUEUE}
    | {tuple(check_names(w[1:])) for _, w in _spans() if w[0] in STYLEQUEUE and len(w) > 1}
)


@pytest.mark.parametrize("words", SHELL, ids=[" ".join(w)[:60] for w in SHELL])
def test_every_shell_line(words: list[str]) -> None:
    check_line(words)


def test_the_extraction_finds_the_readme_commands() -> None:
    """So that a change in the README's layout cannot leave this test checking nothing."""
    how = [check_line(w) for w in SHELL]
    assert how.count("parsed") >= 10 and "make" in how and "venv" in how and NOT_RUN["curl"] in how, how


def test_every_inline_mention() -> None:
    spans, checked = _spans(), 0
    for i, (paragraph, words) in enumerate(spans):
        if words[0] in STYLEQUEUE and len(words) > 1:
            check_names(words[1:])
            checked += 1
        elif words[0] == "make" or (words[0] in PYTHONS and len(words) > 1):
            check_line(words)
        elif all(re.fullmatch(r"--?[a-zA-Z][\w-]*", w) for w in words):  # options alone
            near = [w for p, w in spans[i::-1] + spans[i:] if p == paragraph and w[0] in STYLEQUEUE | PYTHONS]
            if near and near[0][0] in STYLEQUEUE:
                check_names(near[0][1:], words)
                checked += 1
    assert checked >= 20


def test_how_to_reach_the_command_is_said_and_true() -> None:
    assert ".venv/bin/stylequeue" in README and "source .venv/bin/activate" in README
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert re.search(r'^stylequeue\s*=\s*"shared\.cli:main"', scripts, re.M), scripts
    entry = Path(sys.executable).parent / "stylequeue"  # .venv/bin/stylequeue after `make install`
    out = subprocess.run([str(entry), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and "usage: stylequeue" in out.stdout, out.stderr


@pytest.mark.parametrize("path", NAMED, ids=[" ".join(p) or "stylequeue" for p in NAMED])
def test_help_of_every_command_the_readme_names(path: tuple[str, ...]) -> None:
    shown = io.StringIO()
    with redirect_stdout(shown), pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0 and shown.getvalue().startswith("usage: stylequeue")


@pytest.mark.parametrize(
    "bad",
    ["stylequeue submt a.jpg --style s.jpg", "stylequeue run c.jpg s.jpg --sise 64", "make demoo"],
)
def test_a_wrong_command_fails_the_check(bad: str) -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_line(_words(bad))
