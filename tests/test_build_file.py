"""The Bazel BUILD file stays true to the files on disk; no Bazel needed.

BUILD files are Starlark, whose BUILD subset is Python syntax, so the check runs
BUILD with Python stand-ins for Bazel's `glob`, `load` and rules, and compares
the targets it declares with the files on disk: every test file has a `py_test`,
every file of the Python packages is in a target, every file a target names
exists, every dependency is declared.
"""

import dataclasses
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The offline stand-in for rules_python's pip hub (bazel/README.md).
PYPI_BUILD = Path("bazel/offline/pypi/BUILD")


@dataclasses.dataclass
class Target:
    """One rule call in a BUILD file: `kind(name = name, **attrs)`."""

    kind: str
    name: str
    attrs: dict


def _glob(root: Path, include: list[str], exclude: list[str] = (), **_) -> list[str]:
    """Bazel's `glob` for one package at `root`: matching files, sorted."""
    found = {path for pattern in include for path in root.glob(pattern)}
    excluded = {path for pattern in exclude for path in root.glob(pattern)}
    files = (path for path in found - excluded if path.is_file())
    return sorted(path.relative_to(root).as_posix() for path in files)


def _requirement(name: str) -> str:
    """rules_python's `requirement`, spelled like bazel/offline/pypi."""
    return "@pypi//:" + name.lower().replace("-", "_").replace(".", "_")


def evaluate_build(build_file: Path) -> dict[str, Target]:
    """Runs a BUILD file with Python stand-ins; returns its targets by name."""
    targets: dict[str, Target] = {}

    def rule(kind: str):
        def declare(name: str, **attrs) -> None:
            if name in targets:
                raise ValueError(f"{build_file}: two targets named {name!r}")
            targets[name] = Target(kind, name, attrs)

        return declare

    loadable = {
        kind: rule(kind) for kind in ("py_library", "py_binary", "py_test", "sh_binary")
    }
    loadable["requirement"] = _requirement
    namespace = {
        "glob": lambda *args, **kwargs: _glob(build_file.parent, *args, **kwargs),
        "package": lambda **_: None,
        "filegroup": rule("filegroup"),  # native: needs no load()
    }

    def load(_label: str, *names: str, **aliases: str) -> None:
        namespace.update({name: loadable[name] for name in names})
        namespace.update({alias: loadable[name] for alias, name in aliases.items()})

    namespace["load"] = load
    exec(compile(build_file.read_text(), str(build_file), "exec"), namespace)
    return targets


def _files(target: Target) -> list[str]:
    """The file names (not labels) in a target's srcs, data and main."""
    named = [*target.attrs.get("srcs", ()), *target.attrs.get("data", ())]
    named += [target.attrs["main"]] if "main" in target.attrs else []
    return [name for name in named if not name.startswith((":", "//", "@"))]


def untargeted_test_files(targets: dict[str, Target], root: Path) -> list[str]:
    """Test files pytest would collect that no `py_test` has in its srcs."""
    tested = {
        name
        for target in targets.values()
        if target.kind == "py_test"
        for name in target.attrs.get("srcs", ())
    }
    on_disk = _glob(root, ["tests/**/test_*.py"])
    return [f"{name}: no py_test" for name in on_disk if name not in tested]


def unbuilt_package_files(targets: dict[str, Target], root: Path) -> list[str]:
    """Files of the top-level Python packages (e.g. lars_tf/) in no target."""
    in_targets = {name for target in targets.values() for name in _files(target)}
    packages = [init.parent.name for init in root.glob("*/__init__.py")]
    on_disk = _glob(root, [f"{package}/**/*" for package in packages])
    return [
        f"{name}: in no target"
        for name in on_disk
        if name not in in_targets and "__pycache__" not in name
    ]


def missing_files(targets: dict[str, Target], root: Path) -> list[str]:
    """Files named by a target that do not exist, or a `main` not in srcs."""
    problems = [
        f"{target.name}: {name} does not exist"
        for target in targets.values()
        for name in _files(target)
        if not (root / name).is_file()
    ]
    problems += [
        f"{target.name}: main {target.attrs['main']} is not in srcs"
        for target in targets.values()
        if "main" in target.attrs
        and target.attrs["main"] not in target.attrs.get("srcs", ())
    ]
    return problems


def unknown_deps(targets: dict[str, Target], pip_packages: set[str]) -> list[str]:
    """Dependencies on targets of this BUILD or pip packages that do not exist."""
    problems = []
    for target in targets.values():
        for dep in target.attrs.get("deps", ()):
            if dep.startswith("@pypi//:"):
                known = dep.removeprefix("@pypi//:") in pip_packages
            else:
                known = dep.removeprefix("//").removeprefix(":") in targets
            if not known:
                problems.append(f"{target.name}: unknown dependency {dep}")
    return problems


def build_problems(root: Path) -> list[str]:
    """Everything in `root`'s BUILD that disagrees with the files on disk."""
    targets = evaluate_build(root / "BUILD")
    pip_packages = set(evaluate_build(root / PYPI_BUILD))
    return (
        untargeted_test_files(targets, root)
        + unbuilt_package_files(targets, root)
        + missing_files(targets, root)
        + unknown_deps(targets, pip_packages)
    )


def test_repository_build_file_is_true():
    assert build_problems(REPO_ROOT) == []


def test_every_test_file_becomes_its_own_target(tmp_path):
    # The repository's BUILD in a tree with a test file it has never seen.
    shutil.copy(REPO_ROOT / "BUILD", tmp_path / "BUILD")
    for name in ("tests/conftest.py", "tests/test_new.py", "tests/sub/test_deep.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")

    tests = {
        target.name: target.attrs["srcs"]
        for target in evaluate_build(tmp_path / "BUILD").values()
        if target.kind == "py_test"
    }

    assert set(tests) == {"test_new", "sub/test_deep"}
    assert "tests/test_new.py" in tests["test_new"]
    assert "tests/sub/test_deep.py" in tests["sub/test_deep"]


def _write_tree(root: Path, build: str, files: list[str]) -> dict[str, Target]:
    (root / "BUILD").write_text(build)
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return evaluate_build(root / "BUILD")


EXPLICIT_BUILD = """
load("@rules_python//python:defs.bzl", "py_library", "py_test")
load("@pypi//:requirements.bzl", "requirement")
py_library(name = "lib", srcs = ["lib.py"], deps = [requirement("NumPy")])
py_test(name = "test_a", srcs = ["tests/test_a.py"], deps = [":lib", ":gone"])
py_test(name = "test_c", srcs = ["tests/test_c.py"], main = "tests/run.py")
"""


def test_a_test_file_without_target_is_reported(tmp_path):
    files = ["lib.py", "tests/test_a.py", "tests/test_b.py", "tests/test_c.py"]
    targets = _write_tree(tmp_path, EXPLICIT_BUILD, files)

    assert untargeted_test_files(targets, tmp_path) == ["tests/test_b.py: no py_test"]


def test_a_package_file_in_no_target_is_reported(tmp_path):
    build = 'load("x", "py_library")\npy_library(name = "pkg", srcs = ["pkg/a.py"])\n'
    files = ["pkg/__init__.py", "pkg/a.py", "pkg/sub/b.py", "pkg/data.txt"]
    files += ["pkg/__pycache__/a.cpython-311.pyc", "scripts/c.py"]
    targets = _write_tree(tmp_path, build, files)

    assert unbuilt_package_files(targets, tmp_path) == [
        "pkg/__init__.py: in no target",
        "pkg/data.txt: in no target",
        "pkg/sub/b.py: in no target",
    ]


def test_a_missing_file_is_reported(tmp_path):
    targets = _write_tree(tmp_path, EXPLICIT_BUILD, ["lib.py", "tests/test_a.py"])

    assert missing_files(targets, tmp_path) == [
        "test_c: tests/test_c.py does not exist",
        "test_c: tests/run.py does not exist",
        "test_c: main tests/run.py is not in srcs",
    ]


def test_an_unknown_dependency_is_reported(tmp_path):
    targets = _write_tree(tmp_path, EXPLICIT_BUILD, [])

    assert unknown_deps(targets, {"numpy"}) == ["test_a: unknown dependency :gone"]
    assert unknown_deps(targets, set()) == [
        "lib: unknown dependency @pypi//:numpy",
        "test_a: unknown dependency :gone",
    ]


def test_two_targets_with_one_name_are_an_error(tmp_path):
    build = 'py_test(name = "t", srcs = [])\npy_test(name = "t", srcs = [])\n'
    with pytest.raises(ValueError, match="two targets named 't'"):
        _write_tree(tmp_path, 'load("x", "py_test")\n' + build, [])
