"""Entry point of every Bazel `py_test`: runs pytest on the test file it is given.

A `py_test` runs one Python script, and the project's tests are pytest files
with no `__main__` block, so BUILD points every test target at this script with
the test file as its argument.
"""

import os
import sys

import pytest


def main(argv: list[str]) -> int:
    """Runs pytest on `argv` with Bazel's test protocol; returns its exit code."""
    # The runfiles tree is read-only: no .pytest_cache.
    args = [*argv, "-p", "no:cacheprovider"]
    # Bazel's test protocol: a JUnit XML report path and `--test_filter`.
    if xml_output := os.environ.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={xml_output}")
    if test_filter := os.environ.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", test_filter]
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
