"""The large-batch training app: `python -m train.main [--flag=value ...]`.

Parses and checks the flags (`train.config`, before TensorFlow starts), then
calls `train.trainer.run`; the app's flow is in `train/__init__.py`, and
docs/training.md describes the command line and every ending.

Exit status: 0 when the run finished (or was already finished), 2 for a user
error (a flag, a path, the data, a model folder holding another run; one line
on stderr), 3 when the run stopped on non-finite steps, a failed write to the
model folder or a lost multi_worker peer (`train.RunError`), 143 when SIGTERM
stopped it after a checkpoint, 130 when SIGINT did (a second SIGINT: at once,
without one).
"""

import os
import sys

from absl import app, flags, logging

from train import RUN_ERROR_EXIT_CODE, RunError, UserError, config


def _fail(error: Exception, status: int) -> None:
    print(f"train.main: error: {error}", file=sys.stderr)
    sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but any error is one line on stderr and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.CantOpenFlagFileError as error:  # absl's text starts "ERROR:: ".
        _fail(str(error).removeprefix("ERROR:: "), 2)
    except flags.Error as error:  # A line per flag that fails its validator.
        _fail("; ".join(str(error).splitlines()), 2)


def main(argv: list[str]) -> None:
    """Builds the Config, then trains and evaluates as it says."""
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    if not flags.FLAGS["verbosity"].present:  # TF's INFO lines drown the progress.
        logging.set_verbosity(logging.WARNING)
    if flags.FLAGS.deterministic:
        # TensorFlow's oneDNN CPU kernels give results that differ from run to
        # run in the last bits, op determinism or not; read when TF starts.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        run_config = config.from_flag_values(flags.FLAGS)
        from train import trainer  # TensorFlow starts here, after the checks.

        trainer.run(run_config)
    except UserError as error:
        _fail(error, 2)
    except RunError as error:
        _fail(error, RUN_ERROR_EXIT_CODE)


if __name__ == "__main__":
    config.define_flags(flags.FLAGS)
    app.run(main, flags_parser=parse_flags)
