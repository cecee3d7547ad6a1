"""The large-batch ImageNet training app: `python -m train.main --help`.

This file imports no TensorFlow: `train.main` checks its flags against the
names below before TensorFlow starts.
"""

import os

# The models of train/models.py, the sources of train/data.py and the
# augmentation levels of train/preprocessing.py.
MODEL_NAMES = (
    "alexnet",
    "alexnet_bn",
    "resnet50",
    "googlenet",
    "resnet20",
    "small_alexnet",
    "small_alexnet_bn",
)
SOURCES = ("synthetic", "imagenet", "mnist", "fashion_mnist", "tfds")
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
