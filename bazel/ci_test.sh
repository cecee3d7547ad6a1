#!/usr/bin/env bash
# Builds every Bazel target and runs Bazel tests offline with Debian's Bazel 4.2
# (package bazel-bootstrap), using the stand-ins in bazel/offline/ and the
# packages of the `python3` on PATH. See bazel/README.md.
#
#   bazel/ci_test.sh                 # the optimizer's tests: //:test_lars
#   bazel/ci_test.sh //...           # every test
#   bazel/ci_test.sh //:test_data --test_filter=mnist
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

if ! command -v bazel >/dev/null; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bazel/ci_test.sh: no bazel; install it: apt-get install bazel-bootstrap" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q bazel-bootstrap
fi

# The interpreter that has the project's dependencies, resolved now so a test
# cannot pick up another python3 further down PATH (Bazel 4.2's default Python
# toolchain runs the first `python3` on the test's PATH).
python="$(python3 -c 'import sys; print(sys.executable)')"
offline="$repo/bazel/offline"
flags=(
  --override_repository="rules_cc=$offline/rules_cc"
  --override_repository="rules_java=$offline/rules_java"
  --override_repository="rules_python=$offline/rules_python"
  --override_repository="remote_coverage_tools=$offline/remote_coverage_tools"
  --override_repository="pypi=$offline/pypi"
  --test_env=PATH="$(dirname "$python"):$PATH"
  --test_env=TF_CPP_MIN_LOG_LEVEL=2
  --test_output=errors
  --symlink_prefix=/ # no bazel-* links in the working tree
  --curses=no
)
# Tests find the real images from the environment (code default: ../shared/data).
data_dir="${LARS_TF_DATA_DIR:-$repo/../shared/data}"
if [[ -d $data_dir ]]; then
  flags+=(--test_env=LARS_TF_DATA_DIR="$(cd "$data_dir" && pwd)")
fi

# One Bazel server for both commands, stopped on the way out.
trap 'bazel shutdown' EXIT
bazel build "${flags[@]}" //...
if [[ $# -eq 0 ]]; then
  set -- //:test_lars
fi
bazel test "${flags[@]}" "$@"
