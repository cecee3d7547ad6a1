#!/bin/sh
echo "bazel/offline: coverage tools are not available offline" >&2
exit 1
