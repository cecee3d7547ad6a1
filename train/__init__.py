"""The large-batch ImageNet training app: `python -m train.main --help`.

The flow, one module each: `main` (the command line) -> `config` (flags to a
checked `Config`; `sources`: the data's facts) -> `data` and `preprocessing`
(input pipelines), `models`, `optimizers` -> `trainer` (the training loop:
`model_folder` the folder and its checkpoints, `strategy` the devices and the
stop signals, `steps` the tf.functions, `summary` what the run records).

This file imports no TensorFlow: `train.config` checks flags before
TensorFlow starts.
"""

import importlib.util
import os
import sys

# The augmentation levels of train/preprocessing.py (the data sources' names:
# `train.sources.SOURCE_NAMES`).
AUGMENTATIONS = ("none", "minimal", "extended")


def _load_lars_tf_validation():
    """`lars_tf.validation`, loaded without running `lars_tf/__init__.py`.

    `import lars_tf` imports Keras, and so TensorFlow, to register its classes
    for saving: seconds, where a bad flag's whole run takes a fraction of one.
    Loading the one pure-Python module by its path lets the flags be checked
    first; it is entered in `sys.modules`, so a later `import lars_tf` uses
    this module.
    """
    name = "lars_tf.validation"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("lars_tf")  # finds; does not import
    path = os.path.join(package.submodule_search_locations[0], "validation.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


lars_tf_validation = _load_lars_tf_validation()


# What the project provides beside the checkout: data/, paper/TABLES.md.
SHARED_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared",
)


def shared_data_dir() -> str:
    """$LARS_TF_DATA_DIR, else ``../shared/data`` next to the repository root."""
    return os.environ.get("LARS_TF_DATA_DIR", os.path.join(SHARED_DIR, "data"))


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
    non-finite steps in a row, or a write to the model folder failed (no
    space, an I/O error). `train.main` prints its message as one line and
    exits with status 3 (`RUN_ERROR_EXIT_CODE`); the last checkpoint is intact.
    """


RUN_ERROR_EXIT_CODE = 3
