"""The README's command blocks run as written, in order, in a copy of the repository (as in a fresh clone), every
output it shows is the output they give, what they write is covered by .gitignore, and its Python API snippet
runs from another folder as it documents.

Every ```bash and ```python block is run, and every `$ COMMAND` of a ```text block, whose following lines are
its output (stdout; a line ending in `<- stderr` is on stderr; `{...}` stands for any JSON object). Not run: a
block preceded by `<!-- readme-test: skip (why) -->` (installing packages, the whole suite, retraining), a bash
line ending in `# interactive` (the chat needs a terminal), and a bash line that is also a `$ COMMAND` (it runs,
checked, there). `python` in the blocks is this interpreter.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


from tests.conftest import DEMO, EXAMPLES, REPO, needs_demo

SKIP_MARK = "<!-- readme-test: skip"
INTERACTIVE_MARK = "# interactive"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>bash|python|text)\n(?P<body>.*?)```", re.S)
STDERR_MARK = "<- stderr"


def copy_ignore(folder: str, names: list[str]) -> set[str]:
    """What a fresh clone would not have: VCS data, venvs, caches, and exports a user made by following the
    README (export.py refuses to overwrite them)."""
    return {n for n in names if n in (".git", ".venv", "__pycache__", ".pytest_cache")
            or (n.startswith("export") and os.path.isdir(os.path.join(folder, n)))}


def readme_blocks() -> list[tuple[str, str, bool]]:
    """(language, code, skipped) for each command block, in README order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(m["lang"], m["body"], m["before"].strip().startswith(SKIP_MARK)) for m in BLOCK.finditer(text)]


def shown_examples(body: str) -> list[tuple[str, list[str], list[str]]]:
    """(command, stdout lines, stderr lines) of each `$ COMMAND` in a text block."""
    examples: list[tuple[str, list[str], list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            examples.append((line[2:], [], []))
        elif examples:
            is_err = line.rstrip().endswith(STDERR_MARK)
            examples[-1][2 if is_err else 1].append(line.rstrip()[:-len(STDERR_MARK)].rstrip() if is_err else line)
    return examples


def checked_commands() -> set[str]:
    return {cmd for lang, body, skipped in readme_blocks() if lang == "text" and not skipped
            for cmd, _, _ in shown_examples(body)}


def runnable(lang: str, body: str, checked: set[str] = frozenset()) -> str:
    if lang == "python":
        return body
    lines = [line for line in body.splitlines()
             if not line.rstrip().endswith(INTERACTIVE_MARK) and line.strip() not in checked]
    return "\n".join(lines) + "\n"


def shown(line: str) -> re.Pattern:
    """A shown output line as a pattern: `{...}` stands for any JSON object."""
    return re.compile(".*".join(re.escape(piece) for piece in line.split("{...}")))


def check_example(command: str, out: list[str], err: list[str], cwd: Path, env: dict) -> None:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"README example failed: {command}\nstderr:\n{r.stderr[-3000:]}"
    got = r.stdout.splitlines()
    assert len(got) == len(out) and all(shown(want).fullmatch(line) for want, line in zip(out, got)), \
        f"README example {command}\nshows:\n" + "\n".join(out) + "\nprints:\n" + r.stdout
    for want in err:
        assert any(shown(want).fullmatch(line) for line in r.stderr.splitlines()), (command, want, r.stderr)


def test_readme_marks_its_skips_and_interactive_lines() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 5
    assert any(skipped for _, _, skipped in blocks) and not all(skipped for _, _, skipped in blocks)
    # the one-off commands that cannot run here are all marked
    for lang, body, skipped in blocks:
        if "pip install" in body or "pytest" in body:
            assert skipped, body
        for line in body.splitlines():
            if re.fullmatch(r"python infer_\w+\.py --ckpt_dir \S+", line.split("#")[0].strip()):
                assert line.rstrip().endswith(INTERACTIVE_MARK), line  # no input: the interactive chat


@needs_demo
def test_readme_command_blocks_run_as_written(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=copy_ignore)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python"  # a script, not a symlink: a venv's interpreter finds its venv by its own path
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    ran = 0
    checked = checked_commands()
    assert len(checked) >= 7
    for number, (lang, body, skipped) in enumerate(readme_blocks(), 1):
        if skipped:
            continue
        if lang == "text":
            for command, out, err in shown_examples(body):
                check_example(command, out, err, copy, env)
            continue
        code = runnable(lang, body, checked)
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=600,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"README block {number} ({lang}) failed:\n{code}\nstderr:\n{r.stderr[-3000:]}"
        assert "error:" not in r.stderr, f"README block {number}: {r.stderr[-3000:]}"
        ran += 1
    assert ran >= 4
    assert (copy / "export" / "model.safetensors").is_file() and (copy / "answer.wav").is_file()
    # what the examples wrote is ignored by git, so following the README leaves a clean `git status`
    made = sorted(str(p.relative_to(copy)) for p in copy.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and not (REPO / p.relative_to(copy)).exists())
    assert made
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "--stdin"], input="\n".join(made),
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == made, f"not in .gitignore: {sorted(set(made) - set(ignored))}"


def readme_python_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@needs_demo
def test_readme_python_snippet_runs_from_elsewhere_as_documented(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    assert "PYTHONPATH=/path/to/muomni" in text  # the README says how to run it from elsewhere
    code = readme_python_block().replace("checkpoints/demo", str(DEMO)).replace("examples/", f"{EXAMPLES}/")
    code = code.replace('out_path="hello.wav"', f'out_path="{tmp_path / "hello.wav"}"')
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    bare_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bare = subprocess.run([sys.executable, "-c", "import omni"], cwd=tmp_path, capture_output=True, text=True,
                          env=bare_env)
    assert "No module named 'omni'" in bare.stderr  # what the README warns about
    # ... and also for a script kept elsewhere but run from the repository folder (its own folder is on the path)
    script = tmp_path / "elsewhere.py"
    script.write_text("import omni\n")
    bare = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, env=bare_env)
    assert "No module named 'omni'" in bare.stderr and "even when run from the repository folder" in text
