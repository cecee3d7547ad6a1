"""The model folder of a run: its lock, run record, summary and checkpoints.

`trainer.run` calls these in order: `check` (the folder's run must be the one
asked for), `prepare` (the folder, held by this run, and leftovers of a failed
save removed), `make_manager` and `restore_latest` (the newest checkpoint that
reads; newer unreadable ones moved aside), `write_record` once the first step
has trained, `save` between loops, and `release` when the run ends.

The promises (docs/training.md, "The model folder"): no checkpoint that was
good is deleted because of a fault, a run never starts over at step 0 while
the folder holds checkpoints nor resumes under other settings, one run holds
a folder at a time, and every refusal is one line (`train.UserError`, exit 2;
a failed write: `train.RunError`, exit 3).
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time

import tensorflow as tf
from google.protobuf import text_format

from train import RunError, UserError
from train import config as config_lib
from train.config import Config

SUMMARY_FILE = "summary.json"
LOCK_FILE = "lock"  # Held by the run (the chief) while it runs.
CHECKPOINT_STATE = "checkpoint"  # tf.train.CheckpointManager's state file.
_CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)$")
_held: list["FolderLock"] = []  # Taken by `prepare`, dropped by `release`.


def warn(message: str) -> None:
    """A line on stderr about the folder: something repaired or taken over."""
    print(message, file=sys.stderr, flush=True)


def read_summary(model_dir: str) -> dict | None:
    """The summary.json of the folder's run, if it has one."""
    path = os.path.join(model_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def check(config: Config) -> tuple[dict | None, dict | None]:
    """The folder's run record and summary (None where absent).

    Raises:
      train.UserError: the folder holds another run, or checkpoints without
        the run record that says which settings they belong to.
    """
    model_dir = config.model_dir
    record = config_lib.read_run_record(model_dir)
    if record is not None:
        config_lib.check_resume(config, record)
    elif has_checkpoints(model_dir):
        raise UserError(
            f"--model_dir={model_dir} holds checkpoints but no "
            f"{config_lib.RUN_RECORD}, the record of the settings they were "
            f"trained with: restore {os.path.join(model_dir, config_lib.RUN_RECORD)}, "
            "or use a new --model_dir"
        )
    return record, read_summary(model_dir)


def prepare(config: Config, chief: bool, strategy: tf.distribute.Strategy) -> None:
    """Creates the folder and takes this run's hold on it (until `release`):
    the chief holds the folder's lock file, another worker the lock of its
    temporary checkpoint folder. The chief then removes the leftovers of
    checkpoint writes that did not finish. The run record is written later,
    by `write_record`.

    Raises:
      train.UserError: another run holds the folder (nothing was written).
    """
    model_dir = config.model_dir
    if not chief:
        if "://" not in model_dir:
            os.makedirs(model_dir, exist_ok=True)
        name = os.path.basename(worker_temp_dir(strategy, model_dir)) + ".lock"
        _hold(lock(model_dir, name))
        return
    if config.flags.get("model_dir"):
        tf.io.gfile.makedirs(model_dir)
    elif not os.path.isdir(model_dir):  # A fresh default name: never shared.
        os.makedirs(os.path.dirname(model_dir), exist_ok=True)
        os.mkdir(model_dir)
    _hold(lock(model_dir))
    remove_partial_saves(model_dir)


def _hold(folder_lock: "FolderLock | None") -> None:
    if folder_lock is not None:
        _held.append(folder_lock)


def release() -> None:
    """Drops the holds `prepare` took; `trainer.run` calls it however it ends."""
    while _held:
        _held.pop().release()


def write_record(config: Config, record: dict | None, chief: bool) -> dict:
    """Writes the run record (config.json) unless the folder has one; returns
    the record. Called once the first step has trained, so that a run that
    fails on its data before leaves no record behind to refuse its corrected
    command."""
    if record is None:
        record = config_lib.run_record(config)
        if chief:
            config_lib.write_json(
                os.path.join(config.model_dir, config_lib.RUN_RECORD), record
            )
    return record


def make_manager(
    checkpoint: tf.train.Checkpoint,
    step_counter: tf.Variable,
    config: Config,
    strategy: tf.distribute.Strategy,
    chief: bool,
) -> tuple[tf.train.CheckpointManager, str]:
    """The checkpoint manager and the folder it writes to (a temporary one on
    a non-chief worker).

    The chief first sets unreadable checkpoints aside (`newest_readable`), so
    the manager, which reads the `checkpoint` state file once, manages only
    good ones.

    Raises:
      train.UserError: the folder holds checkpoints and none reads.
    """
    model_dir = config.model_dir
    if chief:
        newest_readable(model_dir, repair=True)
    write_dir = model_dir if chief else worker_temp_dir(strategy, model_dir)
    manager = tf.train.CheckpointManager(
        checkpoint,
        write_dir,
        max_to_keep=config.keep_checkpoints,
        step_counter=step_counter,
    )
    return manager, write_dir


def restore_latest(
    checkpoint: tf.train.Checkpoint, model_dir: str, repair: bool
) -> str | None:
    """Restores the newest of the folder's checkpoints that reads whole
    (`newest_readable`); returns its path, or None when the folder holds none.

    Raises:
      train.UserError: the folder holds checkpoints and none restores, or the
        newest readable one does not hold this run's model and optimizer.
    """
    path = newest_readable(model_dir, repair)
    if path is None:
        return None
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        raise UserError(
            f"{path} does not hold this run's model and optimizer "
            f"({_first_line(error)}); use a new --model_dir"
        ) from None
    return path


def newest_readable(model_dir: str, repair: bool) -> str | None:
    """The newest of the folder's checkpoints that reads whole, or None when
    the folder holds none.

    The candidates are those the `checkpoint` state file lists (a write that
    did not finish is not listed), else every `ckpt-N` in the folder. With
    `repair` (the chief; the other workers read the same files and choose
    alike), newer ones that do not read (files missing, truncated,
    overwritten) are named on stderr, moved aside to `unreadable-ckpt-N/` and
    left out of the rewritten state file, so that `--keep_checkpoints` counts
    only good ones; a missing state file is written anew, listing the good
    ones found. Nothing is changed unless some checkpoint reads. A second
    call finds the folder repaired.

    Raises:
      train.UserError: the folder holds checkpoints and none reads.
    """
    state = tf.train.get_checkpoint_state(model_dir)
    listed = list(state.all_model_checkpoint_paths) if state else []
    if state and state.model_checkpoint_path not in listed + [""]:
        listed.append(state.model_checkpoint_path)
    # No state file (or one naming none): the files, and a new state file.
    candidates = listed or _checkpoints_on_disk(model_dir)
    problems = []
    for path in reversed(candidates):
        problem = _unreadable(path)
        if problem is None:
            break
        problems.append((path, problem))
    else:
        if not candidates:
            return None
        raise UserError(
            f"--model_dir={model_dir}: no checkpoint restores ("
            + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in problems)
            + "); nothing was changed. Restore the files, move the checkpoints "
            "and the `checkpoint` file away to start again from step 0, or use a "
            "new --model_dir"
        )
    if repair:
        _repair(model_dir, state if listed else None, candidates, problems, path)
    return path


def _repair(model_dir: str, state, candidates: list, problems: list, good: str):
    """Moves the unreadable `problems` aside and writes the state file that
    lists the rest of `candidates`, `good` the latest (see `newest_readable`)."""
    for bad, why in problems:
        moved = _move_aside(bad)
        warn(
            f"{bad}: {why}; resuming from {os.path.basename(good)}"
            + (f" (its files moved to {moved})" if moved else "")
            + "."
        )
    if problems or state is None:
        kept = [p for p in candidates if p not in dict(problems)]
        _rewrite_state(model_dir, state, kept, good)
        if state is None:
            warn(
                f"{model_dir}: no {CHECKPOINT_STATE} file named its checkpoints; "
                f"wrote one listing the {len(kept)} found "
                f"({', '.join(os.path.basename(p) for p in kept)})."
            )


def worker_temp_dir(strategy: tf.distribute.Strategy, model_dir: str) -> str:
    """Where a non-chief worker writes its (discarded) copy of a checkpoint.

    Every worker must take part in saving (variables may be collective), but
    only the chief's copy is kept.
    """
    resolver = strategy.cluster_resolver
    return os.path.join(
        model_dir, f"workertemp_{resolver.task_type}_{resolver.task_id}"
    )


def save(
    manager: tf.train.CheckpointManager,
    chief: bool,
    write_dir: str,
    step: int,
    last_saved: int | None,
) -> int:
    """Saves a checkpoint numbered `step` unless it was the last saved; returns
    `step`. Every worker decides alike, since saving can be collective.

    Raises:
      train.RunError: the write failed (no space, an I/O error, a read-only
        folder); the previous checkpoint is intact (TensorFlow names a new
        one in the `checkpoint` file only once its files are written).
    """
    if step != last_saved:
        try:
            manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as error:
            previous = manager.latest_checkpoint
            raise RunError(
                f"could not write checkpoint ckpt-{step} in {write_dir}: "
                f"{_cause(error)}; "
                + (
                    f"the last checkpoint, {previous}, is intact"
                    if previous
                    else "no checkpoint was written before"
                )
            ) from None
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    return step


def _cause(error: Exception) -> str:
    """The operating system's reason in a TensorFlow I/O error ("No space left
    on device"), with the error's type."""
    text = (getattr(error, "message", None) or str(error)).strip()
    text = text.splitlines()[0] if text else ""
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)  # {{function_node ...}}
    text = re.sub(r"\s*\[Op:\w+\]$", "", text)
    reason = text.rsplit("; ", 1)[-1] or type(error).__name__
    return f"{_shorten(reason)} ({type(error).__name__})"


class FolderLock:
    """A run's exclusive hold on a model folder (or on a worker's part of it).

    An open lock file under `fcntl.flock`: the kernel drops the lock when the
    process ends, however it ends (SIGKILL included), so a lock is never held
    by a process that is gone. The file names the holder (host, pid, start)
    for the message a second run gets.
    """

    def __init__(self, path: str, fd: int):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Removes the lock file and drops the lock; a second call does nothing.

        The file goes while still locked, so no other process can lock it
        after this one left (`lock` checks it locked the file at the path).
        """
        if self._fd is None:
            return
        # A file that cannot go (a read-only folder) is taken over next time.
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def lock(
    folder: str, name: str = LOCK_FILE, flag: str = "--model_dir"
) -> FolderLock | None:
    """Holds `folder`/`name` for this process until `FolderLock.release` or
    the process's end; None for a folder behind a URL (`gs://...`), where
    files cannot be locked. `flag` names the folder in the messages.

    A lock file left by a process that is gone (killed: it could not remove
    its file) is taken over, with a line on stderr naming it.

    Raises:
      train.UserError: another process (or another run in this one) holds it;
        the message names the folder and the holder.
    """
    if "://" in folder:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(
                f"{flag}={folder}: cannot create its lock file {path} "
                f"({error.strerror}); give a writable {flag}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{flag}={folder} is in use by another run "
                f"({holder or 'a process'}; lock file {path}): wait for it to "
                f"end, or give another {flag}"
            ) from None
        try:  # The file the holder removed on release is not the lock any more.
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    left = _holder(fd)
    if left:
        warn(f"{folder}: took over the lock left by {left}, which has ended ({path}).")
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    held = FolderLock(path, fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError as error:
        held.release()
        raise UserError(
            f"{flag}={folder}: cannot write its lock file {path} ({error.strerror})"
        ) from None
    return held


def _holder(fd: int) -> str:
    """Who the lock file open as `fd` names: "pid P on host H (since T)"."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {record['pid']} on host {record['host']} (since {record['since']})"
    except (ValueError, TypeError, KeyError):
        return ""


def has_checkpoints(model_dir: str) -> bool:
    """Whether the folder holds checkpoints (or a state file naming some)."""
    return bool(
        tf.io.gfile.exists(os.path.join(model_dir, CHECKPOINT_STATE))
        or _checkpoints_on_disk(model_dir)
    )


def _checkpoints_on_disk(model_dir: str) -> list[str]:
    """The prefixes of the folder's `ckpt-N.index` files, by step."""
    prefixes = [
        path.removesuffix(".index")
        for path in tf.io.gfile.glob(os.path.join(model_dir, "ckpt-*.index"))
    ]
    prefixes = [p for p in prefixes if _CHECKPOINT_NAME.search(p)]
    return sorted(prefixes, key=lambda p: int(_CHECKPOINT_NAME.search(p).group(1)))


def remove_partial_saves(model_dir: str) -> None:
    """Removes the `ckpt-N_temp/` folders of checkpoint writes that did not
    finish (a full disk, a crash), each with a line on stderr. Only for the
    folder's holder: a running save's folder looks the same."""
    for path in tf.io.gfile.glob(os.path.join(model_dir, "ckpt-*_temp")):
        tf.io.gfile.rmtree(path)
        warn(
            f"{model_dir}: removed {path}, left by a checkpoint write that "
            "did not finish."
        )


def _unreadable(prefix: str) -> str | None:
    """Why the checkpoint `prefix` does not read whole (every tensor, which
    checks their checksums), or None when it does."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except tf.errors.NotFoundError:
        return "its files are missing"
    except (tf.errors.OpError, IndexError, ValueError, OSError) as error:
        return f"unreadable ({type(error).__name__}: {_first_line(error)})"
    return None


def _first_line(error: Exception) -> str:
    text = (getattr(error, "message", None) or str(error)).strip()
    return _shorten(text.splitlines()[0] if text else type(error).__name__)


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _move_aside(prefix: str) -> str | None:
    """Moves the files of checkpoint `prefix` into `unreadable-ckpt-N/` next
    to it (a new name if that exists); returns the folder, or None when there
    were no files to move."""
    files = tf.io.gfile.glob(prefix + ".index") + tf.io.gfile.glob(prefix + ".data-*")
    if not files:
        return None
    folder, name = os.path.split(prefix)
    target = os.path.join(folder, f"unreadable-{name}")
    suffix = 1
    while tf.io.gfile.exists(target):
        suffix += 1
        target = os.path.join(folder, f"unreadable-{name}-{suffix}")
    tf.io.gfile.makedirs(target)
    for path in files:
        tf.io.gfile.rename(path, os.path.join(target, os.path.basename(path)))
    return target


def _rewrite_state(model_dir: str, state, good: list[str], latest: str) -> None:
    """Writes the `checkpoint` state file listing `good` (oldest first), with
    their recorded times, so the CheckpointManager manages only those."""
    if state:
        times = dict(
            zip(state.all_model_checkpoint_paths, state.all_model_checkpoint_timestamps)
        )
        preserved = state.last_preserved_timestamp
    else:  # Rebuilt from the files: every checkpoint under --keep_checkpoints.
        times = {p: tf.io.gfile.stat(p + ".index").mtime_nsec / 1e9 for p in good}
        preserved = min(times.values()) - 1
    timestamps = [times[p] for p in good] if all(p in times for p in good) else None
    proto = tf.compat.v1.train.generate_checkpoint_state_proto(
        model_dir,
        os.path.basename(latest),
        all_model_checkpoint_paths=[os.path.basename(p) for p in good],
        all_model_checkpoint_timestamps=timestamps,
        last_preserved_timestamp=preserved,
    )
    path = os.path.join(model_dir, CHECKPOINT_STATE)
    temporary = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "w") as file:
        file.write(text_format.MessageToString(proto))
    tf.io.gfile.rename(temporary, path, overwrite=True)
