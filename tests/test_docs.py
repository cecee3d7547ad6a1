"""Every code block in the documentation is run, so the docs cannot drift.

Files: README.md, bazel/README.md and docs/**/*.md (a new file is picked up by
itself). Fences by language:

- ``python``: run. All python blocks of one file run in one Python process in
  document order, sharing one namespace, so a block may use an earlier one's
  names and TensorFlow is imported once per file.
- ``bash``/``sh``: run, each block as its own ``bash -e -o pipefail`` script,
  in document order between the python blocks of the same file.
- ``text``: output, listings, file contents; never run.
- anything else must carry a ``not run`` marker.

Markers are HTML comments on their own line right before the fence (blank lines
may separate them):

- ``<!-- not run: REASON -->``: never run; the reason is required and listed
  in pytest's skips (``-rs``).
- ``<!-- needs shared data -->``: the block reads the shared data folder
  (``train.shared_data_dir()``); without it the file's run is skipped.
- ``<!-- exit status: N -->``: a bash block expected to end with status N
  (absl's ``--help`` exits 1; a documented user error exits 2); any other
  status, 0 included, fails.

Each file runs in a fresh temporary folder that mirrors the repository root
(a symlink to each top-level entry git does not ignore), with ``../shared/data``
leading to the shared data when it exists, so relative paths in the docs work
as written there while whatever the blocks write stays out of the repository.

Run as a script (``python tests/test_docs.py``) this file is the runner the
tests start: it reads the blocks as JSON on stdin.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import traceback

import pytest

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash"}
TEXT_LANGUAGES = {"text"}
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
_NOT_RUN = re.compile(r"^not run:(?P<reason>.*)$")
_NEEDS_DATA = "needs shared data"
_EXIT_STATUS = re.compile(r"^exit status: (?P<status>\d+)$")
# The whole runner per file: generous, only to turn a hang into a failure.
_FILE_TIMEOUT_S = 900


@dataclasses.dataclass
class Block:
    """One fenced code block of a Markdown file."""

    path: str  # relative to the repository root
    line: int  # 1-based line of the first line inside the fence
    language: str
    source: str
    not_run_reason: str | None = None
    needs_shared_data: bool = False
    exit_status: int = 0

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.not_run_reason is None and self.language in RUN_LANGUAGES


def doc_files(root: str = REPO) -> list[str]:
    """The Markdown files whose code blocks are tested, relative to ``root``."""
    paths = ["README.md", "bazel/README.md"]
    paths += sorted(
        os.path.relpath(p, root)
        for p in glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True)
    )
    return [p for p in paths if os.path.isfile(os.path.join(root, p))]


def parse_blocks(path: str, root: str = REPO) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one file, and the problems with its markers."""
    with open(os.path.join(root, path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: list[tuple[int, str]] = []  # markers waiting for their fence
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        marker = _MARKER.match(lines[i])
        if fence:
            indent, ticks = len(fence["indent"]), fence["fence"]
            language = fence["info"].split()[0].lower() if fence["info"] else ""
            start = i + 1
            i += 1
            while i < len(lines) and not (
                lines[i].strip().startswith(ticks)
                and lines[i].strip().strip(ticks[0]) == ""
            ):
                i += 1
            # Inside a list item the fence is indented: drop that indentation.
            body = [
                line[indent:] if line[:indent].strip() == "" else line.lstrip()
                for line in lines[start:i]
            ]
            block = Block(path, start + 1, language, "\n".join(body) + "\n")
            for marker_line, body_text in pending:
                not_run = _NOT_RUN.match(body_text)
                if not_run:
                    block.not_run_reason = not_run["reason"].strip()
                    if not block.not_run_reason:
                        problems.append(
                            f"{path}:{marker_line}: 'not run:' needs a reason"
                        )
                elif body_text == _NEEDS_DATA:
                    block.needs_shared_data = True
                else:
                    block.exit_status = int(_EXIT_STATUS.match(body_text)["status"])
                    if RUN_LANGUAGES.get(block.language) != "bash":
                        problems.append(
                            f"{path}:{marker_line}: 'exit status' is for bash blocks"
                        )
            pending = []
            blocks.append(block)
        elif marker and (
            _NOT_RUN.match(marker["body"])
            or marker["body"] == _NEEDS_DATA
            or _EXIT_STATUS.match(marker["body"])
        ):
            pending.append((i + 1, marker["body"]))
        elif lines[i].strip() and pending:
            for marker_line, _ in pending:
                problems.append(
                    f"{path}:{marker_line}: marker not directly before a code block"
                )
            pending = []
        i += 1
    for marker_line, _ in pending:
        problems.append(f"{path}:{marker_line}: marker not followed by a code block")
    for block in blocks:
        if block.language in TEXT_LANGUAGES:
            if (
                block.not_run_reason is not None
                or block.needs_shared_data
                or (block.exit_status)
            ):
                problems.append(f"{block.where}: a text block takes no marker")
        elif not block.language:
            problems.append(
                f"{block.where}: fence without a language (text for output, "
                "python or bash for code)"
            )
        elif block.language not in RUN_LANGUAGES and block.not_run_reason is None:
            problems.append(
                f"{block.where}: ```{block.language} is not run: "
                "mark it <!-- not run: REASON --> or make it ```text"
            )
    return blocks, problems


def _runnable_files() -> list[str]:
    return [p for p in doc_files() if any(b.runs for b in parse_blocks(p)[0])]


def _files_with_unrun_blocks() -> list[str]:
    return [p for p in doc_files() if any(b.not_run_reason for b in parse_blocks(p)[0])]


def _mirror_repository(workdir: str, data_dir: str | None) -> str:
    """A folder under ``workdir`` linking to each top-level entry of the repo."""
    root = os.path.join(workdir, "repo")
    os.makedirs(root)
    names = [name for name in os.listdir(REPO) if name != ".git"]
    # Ignored entries (runs/, build outputs) stay out: what the docs write
    # there must land in the temporary folder, not in the repository.
    try:
        ignored = subprocess.run(
            ["git", "check-ignore", *names], cwd=REPO, capture_output=True, text=True
        ).stdout.split()
    except OSError:  # no git: not a checkout, nothing is ignored
        ignored = []
    for name in names:
        if name not in ignored:
            os.symlink(os.path.join(REPO, name), os.path.join(root, name))
    if data_dir:
        os.makedirs(os.path.join(workdir, "shared"))
        os.symlink(data_dir, os.path.join(workdir, "shared", "data"))
    return root


def _run_blocks(
    blocks: list[Block], workdir: str, data_dir: str | None
) -> subprocess.CompletedProcess:
    """Runs the runnable blocks in a fresh process; output in ``.stdout``."""
    cwd = _mirror_repository(workdir, data_dir)
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])
    env["TMPDIR"] = workdir
    if data_dir:
        env["LARS_TF_DATA_DIR"] = data_dir
    payload = json.dumps([dataclasses.asdict(b) for b in blocks if b.runs])
    return subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        input=payload,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=_FILE_TIMEOUT_S,
    )


def _shared_data_dir() -> str | None:
    data_dir = os.path.abspath(train.shared_data_dir())
    return data_dir if os.path.isdir(data_dir) else None


def test_every_code_block_is_run_or_marked():
    problems = [p for path in doc_files() for p in parse_blocks(path)[1]]
    assert not problems, "\n".join(problems)


def test_relative_links_lead_to_files():
    problems = []
    for path in doc_files():
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^(https?:|mailto:|#)", target):
                continue
            resolved = os.path.join(REPO, os.path.dirname(path), target.split("#")[0])
            if not os.path.exists(resolved):
                problems.append(f"{path}: link to {target}: no such file")
    assert not problems, "\n".join(problems)


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read().splitlines()
    command = ci[ci.index("# The README's test command, verbatim:") + 1]
    readme = parse_blocks("README.md")[0]
    assert any(
        command in b.source.splitlines() for b in readme if b.language == "bash"
    ), f"README.md has no bash block with .ci/run's test command: {command}"


def pytest_generate_tests(metafunc):
    """One test per documentation file, named by its path."""
    if "doc_file" in metafunc.fixturenames:
        metafunc.parametrize("doc_file", _runnable_files())
    if "doc_file_with_unrun_blocks" in metafunc.fixturenames:
        metafunc.parametrize("doc_file_with_unrun_blocks", _files_with_unrun_blocks())


def test_blocks_marked_not_run(doc_file_with_unrun_blocks):
    """Lists, as one skip per file, the blocks the docs mark as not run."""
    blocks, _ = parse_blocks(doc_file_with_unrun_blocks)
    pytest.skip(
        "; ".join(
            f"{b.where} not run: {b.not_run_reason}" for b in blocks if b.not_run_reason
        )
    )


def test_doc_blocks_run(doc_file, tmp_path):
    blocks, _ = parse_blocks(doc_file)
    data_dir = _shared_data_dir()
    needing = [b.where for b in blocks if b.runs and b.needs_shared_data]
    if needing and data_dir is None:
        pytest.skip(f"{', '.join(needing)} need the shared data folder (absent)")
    result = _run_blocks(blocks, str(tmp_path), data_dir)
    assert result.returncode == 0, result.stdout[-8000:]


def test_a_broken_block_fails_naming_its_line(tmp_path):
    """The runner itself: blocks run in order; the first failing one is named."""
    source = tmp_path / "broken.md"
    source.write_text(
        "```python\nvalue = 1\n```\n\n"
        "```bash\ntest -d lars_tf && echo 2 > value.txt\n```\n\n"
        "<!-- not run: shows the marker -->\n```bash\nfalse\n```\n\n"
        "<!-- exit status: 3 -->\n```bash\nexit 3\n```\n\n"
        "```python\nassert value == int(open('value.txt').read()), 'drifted'\n```\n"
        "```bash\nexit 3\n```\n"
    )
    blocks, problems = parse_blocks(source.name, root=str(tmp_path))
    assert problems == []
    assert [(b.line, b.runs, b.exit_status) for b in blocks] == [
        (2, True, 0),
        (6, True, 0),
        (11, False, 0),
        (16, True, 3),
        (20, True, 0),
        (23, True, 0),
    ]
    result = _run_blocks(blocks, str(tmp_path / "work"), None)
    assert result.returncode == 1
    # The bash blocks ran in the repository's mirror, and the one expected to
    # end with status 3 passed; the python block after them saw value.txt.
    assert "ok broken.md:6" in result.stdout
    assert "ok broken.md:16" in result.stdout
    assert "FAILED broken.md:20" in result.stdout
    assert "AssertionError: drifted" in result.stdout
    assert "broken.md:23" not in result.stdout

    blocks[4].source = "assert value == 1\n"
    result = _run_blocks(blocks, str(tmp_path / "work2"), None)
    assert "FAILED broken.md:23" in result.stdout
    assert "exit status 3, expected 0" in result.stdout


def test_unmarked_and_dangling_markers_are_problems(tmp_path):
    (tmp_path / "doc.md").write_text(
        "```starlark\nx = 1\n```\n\n"
        "```\nplain\n```\n\n"
        "<!-- not run: -->\n```bash\necho hi\n```\n\n"
        "<!-- not run: reason -->\nSome prose.\n\n"
        "<!-- needs shared data -->\n"
    )
    _, problems = parse_blocks("doc.md", root=str(tmp_path))
    assert problems == [
        "doc.md:9: 'not run:' needs a reason",
        "doc.md:14: marker not directly before a code block",
        "doc.md:17: marker not followed by a code block",
        "doc.md:2: ```starlark is not run: mark it <!-- not run: REASON --> "
        "or make it ```text",
        "doc.md:6: fence without a language (text for output, python or bash for code)",
    ]


def _runner() -> int:
    """Runs the blocks given as JSON on stdin, in order; 1 at the first failure."""
    namespace = {"__name__": "__main__"}
    for block in json.load(sys.stdin):
        where = f"{block['path']}:{block['line']}"
        print(f"--- {where} ({block['language']})", flush=True)
        try:
            if RUN_LANGUAGES[block["language"]] == "python":
                # Padded and named after the Markdown file, so that tracebacks
                # show that file's lines and line numbers.
                padded = "\n" * (block["line"] - 1) + block["source"]
                filename = os.path.join(REPO, block["path"])
                exec(compile(padded, filename, "exec"), namespace)
            else:
                status = subprocess.run(
                    ["bash", "-e", "-o", "pipefail", "-c", block["source"]]
                ).returncode
                if status != block["exit_status"]:
                    raise RuntimeError(
                        f"exit status {status}, expected {block['exit_status']}"
                    )
        except BaseException:  # any failure, SystemExit included, names its block
            sys.stdout.flush()
            traceback.print_exc(file=sys.stdout)
            print(f"FAILED {where}", flush=True)
            return 1
        sys.stdout.flush()
        print(f"ok {where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_runner())
