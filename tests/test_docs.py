"""Every code block of the README and of docs/ runs: Python blocks as written, in order, from one folder outside
the repository (the README's first, so the docs can read what its example wrote); every ``cad`` command of a
bash block is parsed against the CLI (``--print_config``), and every benchmark it names exists."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(language: str) -> list[tuple[str, int, str]]:
    """(page, index, code) of every ``language`` block of the README and docs/, in reading order."""
    out = []
    for page in PAGES:
        found = re.findall(rf"^```{language}\n(.*?)^```$", page.read_text(encoding="utf-8"), re.S | re.M)
        out += [(page.relative_to(ROOT).as_posix(), n, code) for n, code in enumerate(found)]
    return out


def commands(code: str) -> list[list[str]]:
    """The shell commands of a bash block, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


PYTHON = blocks("python")
CAD = [(page, words) for page, _, code in blocks("bash") for words in commands(code) if words[0] == "cad"]
CAD += [(page.relative_to(ROOT).as_posix(), shlex.split(code))  # inline, as in the tables of jobs
        for page in PAGES for code in re.findall(r"`(cad (?:fit|test|predict) [^`]+)`", page.read_text(encoding="utf-8"))]
BENCHMARKS = sorted({word for _, _, code in blocks("bash") for words in commands(code) for word in words
                     if word.startswith("benchmarks/")}
                    | set(re.findall(r"python (benchmarks/\w+\.py)", "".join(p.read_text(encoding="utf-8") for p in PAGES))))


def test_every_page_has_code_and_the_readme_is_short():
    assert len(PYTHON) >= 4 and len(CAD) >= 30
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    return tmp_path_factory.mktemp("outside_the_checkout")


@pytest.mark.slow
@pytest.mark.parametrize("page, index, code", PYTHON, ids=[f"{p}-{i}" for p, i, _ in PYTHON])
def test_a_python_block_runs_as_written(page, index, code, outside):
    script = outside / f"{page.replace('/', '_')}-{index}.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=outside, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("page, words", CAD, ids=[f"{p}:{' '.join(w[1:4])}" for p, w in CAD])
def test_a_cad_command_parses(page, words, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [w for w in words[1:] if w != "--print_config"]
    if not any(w.endswith(".help") or w == "--help" for w in args):
        args.append("--print_config")
    assert run_cli(args) == 0, f"{page}: {' '.join(words)}"


@pytest.mark.parametrize("path", BENCHMARKS)
def test_a_named_benchmark_exists(path):
    assert (ROOT / path).is_file()
