# Offline stand-in for the `requirements.bzl` that rules_python's pip.parse
# generates. Offline the packages come from the site-packages of the `python3`
# that runs the tests, so each requirement is an empty library (listed in BUILD).
def requirement(name):
    """Returns the label of pip package `name`, e.g. "absl-py": @pypi//:absl_py."""
    return "@pypi//:" + name.lower().replace("-", "_").replace(".", "_")
