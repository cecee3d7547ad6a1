# Offline stand-in for @rules_python//python:defs.bzl, which the project's BUILD
# loads (as Bazel 7+ requires). Bazel 4.2 has the Python rules built in.
py_binary = native.py_binary
py_library = native.py_library
py_runtime = native.py_runtime
py_test = native.py_test
