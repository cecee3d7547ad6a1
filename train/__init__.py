"""The large-batch ImageNet training app: `python -m train.main --help`.

The flow, one module each: `main` (the command line) -> `config` (flags to a
checked `Config`; `sources`: the data's facts) -> `data` and `preprocessing`
(input pipelines), `models`, `optimizers` -> `trainer` (the training loop).

This file imports no TensorFlow: `train.config` checks flags before
TensorFlow starts.
"""

import os

# The augmentation levels of train/preprocessing.py (the data sources' names:
# `train.sources.SOURCE_NAMES`).
AUGMENTATIONS = ("none", "minimal", "extended")


def shared_data_dir() -> str:
    """$LARS_TF_DATA_DIR, else ``../shared/data`` next to the repository root."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = os.path.join(os.path.dirname(repo_root), "shared", "data")
    return os.environ.get("LARS_TF_DATA_DIR", default)


class UserError(Exception):
    """A mistake in the user's input (a flag, a path, a file's contents).

    `train.main` prints its message as one line and exits with status 2; the
    message names the flag or file and says what is allowed. Never raised for
    our own bugs (those keep their tracebacks).
    """


class FlagError(UserError, ValueError):
    """A flag's value is invalid; the message starts with the flag's name.

    Defined here, not in train/main.py, because `python -m train.main` runs
    that file as `__main__`: importing it again would define its flags twice.
    """

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


class RunError(Exception):
    """The run stopped for a reason other than the user's input: too many
    non-finite steps in a row. `train.main` prints its message as one line and
    exits with status 3 (`RUN_ERROR_EXIT_CODE`); the last checkpoint is intact.
    """


RUN_ERROR_EXIT_CODE = 3
