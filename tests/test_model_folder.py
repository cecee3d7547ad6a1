"""The model folder's promises (train/model_folder.py, through `trainer.run`):
a good checkpoint is never deleted because of a fault, a run never silently
starts over or changes its settings, one run holds a folder at a time, and a
failed checkpoint write is one line with the previous checkpoint intact.

Tiny in-process runs (synthetic data, 16x16 images, a few steps); a
subprocess only where a lock between processes must be seen.
"""

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import types

import helpers
import keras
import numpy as np
import pytest
import tensorflow as tf

from train import RunError, UserError, config, model_folder, trainer

TINY = {
    "source": "synthetic",
    "num_classes": 10,
    "image_size": 16,
    "global_batch_size": 8,
    "warmup_epochs": 0,
    "skip_eval": True,
    "steps_per_loop": 2,
    # Step decay: a run may be extended, so a test can resume a finished one.
    "lr_schedule": "step",
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(model_dir, **settings) -> config.Config:
    return config.make_config(**{**TINY, **settings}, model_dir=str(model_dir))


def _snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                files[os.path.relpath(path, folder)] = file.read()
    return files


def _step_of(prefix: str) -> int:
    reader = tf.train.load_checkpoint(prefix)
    return int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))


def _listed(model_dir) -> list[str]:
    """The checkpoints the `checkpoint` state file lists, by name."""
    state = tf.train.get_checkpoint_state(str(model_dir))
    return [os.path.basename(p) for p in state.all_model_checkpoint_paths]


@pytest.fixture
def six_steps(tmp_path):
    """A finished run of 6 steps with checkpoints 2, 4 and 6."""
    model_dir = tmp_path / "run"
    trainer.run(_config(model_dir, train_steps=6, checkpoint_every_steps=2))
    assert _listed(model_dir) == ["ckpt-2", "ckpt-4", "ckpt-6"]
    return model_dir


def test_unreadable_newer_checkpoints_are_moved_aside_and_the_run_resumes(
    six_steps, capfd
):
    model_dir = six_steps
    for name in os.listdir(model_dir):  # ckpt-6: its files are gone.
        if name.startswith("ckpt-6."):
            os.remove(model_dir / name)
    data_file = model_dir / "ckpt-4.data-00000-of-00001"  # ckpt-4: truncated.
    truncated = data_file.read_bytes()[: data_file.stat().st_size // 2]
    data_file.write_bytes(truncated)
    index = (model_dir / "ckpt-4.index").read_bytes()
    capfd.readouterr()

    class ListedCheckpoints(tf.keras.callbacks.Callback):
        """The state file's checkpoints at the start and after each loop."""

        def on_train_begin(self, logs=None):
            self.listed = {"start": _listed(model_dir)}

        def on_train_batch_end(self, batch, logs=None):
            self.listed[batch + 1] = _listed(model_dir)

    listed = ListedCheckpoints()
    # keep_checkpoints=2: had the checkpoint manager kept ckpt-4 and ckpt-6 on
    # its list, its save of ckpt-4 would have deleted ckpt-2.
    c = _config(model_dir, train_steps=8, checkpoint_every_steps=2, keep_checkpoints=2)
    summary = trainer.run(c, callbacks=[listed])

    assert summary["resumed_from_step"] == 2 and summary["steps"] == 8
    assert listed.listed["start"] == ["ckpt-2"]  # The good one only.
    assert listed.listed[6] == ["ckpt-2", "ckpt-4"]  # After the save at 4.
    err = capfd.readouterr().err
    assert f"{model_dir / 'ckpt-6'}: its files are missing" in err
    assert f"{model_dir / 'ckpt-4'}: unreadable" in err
    # Moved aside, byte for byte, under a name that says why.
    aside = model_dir / "unreadable-ckpt-4"
    assert (aside / "ckpt-4.data-00000-of-00001").read_bytes() == truncated
    assert (aside / "ckpt-4.index").read_bytes() == index
    assert f"moved to {aside}" in err
    assert _listed(model_dir) == ["ckpt-6", "ckpt-8"]
    assert _step_of(str(model_dir / "ckpt-8")) == 8


def test_when_no_checkpoint_restores_the_run_stops_and_changes_nothing(six_steps):
    model_dir = six_steps
    for step in (2, 4, 6):
        data_file = model_dir / f"ckpt-{step}.data-00000-of-00001"
        data_file.write_bytes(data_file.read_bytes()[:100])
    before = _snapshot(model_dir)
    with pytest.raises(UserError) as error:
        trainer.run(_config(model_dir, train_steps=8, checkpoint_every_steps=2))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"--model_dir={model_dir}: no checkpoint restores")
    assert "ckpt-6" in message and "ckpt-2" in message
    assert _snapshot(model_dir) == before


def test_without_the_checkpoint_file_the_run_resumes_from_the_newest_on_disk(
    six_steps, capfd
):
    model_dir = six_steps
    os.remove(model_dir / model_folder.CHECKPOINT_STATE)
    c = _config(model_dir, train_steps=8, checkpoint_every_steps=2, keep_checkpoints=3)
    capfd.readouterr()
    summary = trainer.run(c)
    assert summary["resumed_from_step"] == 6 and summary["steps"] == 8
    assert "wrote one listing the 3 found (ckpt-2, ckpt-4, ckpt-6)" in (
        capfd.readouterr().err
    )
    # The rebuilt state file put the found checkpoints under --keep_checkpoints.
    assert _listed(model_dir) == ["ckpt-4", "ckpt-6", "ckpt-8"]
    assert not (model_dir / "ckpt-2.index").exists()


def test_checkpoints_without_the_run_record_are_refused(six_steps):
    model_dir = six_steps
    os.remove(model_dir / config.RUN_RECORD)
    before = _snapshot(model_dir)
    with pytest.raises(UserError) as error:  # Other settings: would pass silently.
        trainer.run(_config(model_dir, train_steps=8, optimizer="sgd"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"--model_dir={model_dir} holds checkpoints but no")
    assert "config.json" in message and "new --model_dir" in message
    assert _snapshot(model_dir) == before


def test_a_run_that_fails_on_its_data_leaves_no_run_record(tmp_path):
    """Labels 1-3 with --num_classes=2: refused at the first batch, and the
    corrected command in the same folder trains."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    records = [
        helpers.imagenet_example(
            tf.io.encode_jpeg(helpers.smooth_image(rng)).numpy(), 1 + i % 3
        )
        for i in range(8)
    ]
    for split in ("train", "validation"):
        helpers.write_records(str(data_dir / f"{split}-00000-of-00001"), records)
    model_dir = tmp_path / "run"
    settings = dict(source="imagenet", data_dir=str(data_dir), global_batch_size=4)
    with pytest.raises(UserError, match="label out of range"):
        trainer.run(_config(model_dir, num_classes=2, train_steps=2, **settings))
    assert not (model_dir / config.RUN_RECORD).exists()
    assert not any((model_dir / name).exists() for name in ("train", "eval"))
    summary = trainer.run(_config(model_dir, num_classes=3, train_steps=2, **settings))
    assert summary["steps"] == 2
    assert config.read_run_record(str(model_dir))["config"]["num_classes"] == 3


# Holds a model folder's lock until killed: prints "held" once it holds it.
_HOLDER = """
import sys
from train import model_folder
lock = model_folder.lock(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def _start_lock_holder(model_dir) -> subprocess.Popen:
    """A process running `_HOLDER` on `model_dir` (read "held" from it)."""
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(model_dir)],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_one_run_per_folder_and_a_dead_holders_lock_is_taken_over(tmp_path, capfd):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    holder = _start_lock_holder(model_dir)
    try:
        assert holder.stdout.readline() == "held\n"
        before = _snapshot(model_dir)
        # The command line: one line on stderr, exit 2, nothing written.
        result = subprocess.run(
            [sys.executable, "-m", "train.main", "--train_steps=2"]
            + [f"--{k}={v}" for k, v in TINY.items()]
            + [f"--model_dir={model_dir}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(f"train.main: error: --model_dir={model_dir} is ")
        assert f"pid {holder.pid} on host" in lines[-1]
        assert _snapshot(model_dir) == before
        assert not (model_dir / config.RUN_RECORD).exists()
        # In this process too (a lock is per open file, not per process).
        with pytest.raises(UserError, match=f"pid {holder.pid} on host"):
            trainer.run(_config(model_dir, train_steps=2))
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, its file stays.
        holder.wait()
    assert (model_dir / model_folder.LOCK_FILE).exists()
    capfd.readouterr()
    summary = trainer.run(_config(model_dir, train_steps=2))
    assert summary["steps"] == 2
    err = capfd.readouterr().err
    assert f"took over the lock left by pid {holder.pid} on host" in err
    assert not (model_dir / model_folder.LOCK_FILE).exists()  # Released.


def test_a_second_multi_worker_cluster_on_a_held_folder_is_refused(tmp_path):
    """Each worker of a second cluster started on the folder that a running
    cluster holds ends in one line naming the lock it wants and its holder,
    exit 2, having written nothing: its chief wants the folder's lock, its
    worker 1 the lock of its temporary checkpoint folder."""
    model_dir = tmp_path / "run"
    args = ["--train_steps=100000", "--log_every_steps=2"]
    args += [f"--{k}={v}" for k, v in TINY.items()]
    second = []
    first = helpers.start_workers(model_dir, helpers.local_worker_addresses(2), args)
    try:
        helpers.read_until(first[0], r"train step ")  # Both hold their locks.
        for process in first:  # Still holding, but writing nothing from now on.
            process.send_signal(signal.SIGSTOP)
        before = _snapshot(model_dir)
        second = helpers.start_workers(
            model_dir, helpers.local_worker_addresses(2), args
        )
        outputs = [process.communicate(timeout=300) for process in second]
        after = _snapshot(model_dir)
    finally:
        for process in first + second:
            process.kill()
            process.wait()
    locks = [model_dir / model_folder.LOCK_FILE, model_dir / "workertemp_worker_1.lock"]
    for process, (stdout, stderr), held, holder in zip(
        second, outputs, locks, first, strict=True
    ):
        assert process.returncode == 2, stderr[-3000:]
        assert "Traceback" not in stderr and "train step" not in stdout, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if "train.main" in line]
        assert errors == stderr.splitlines()[-1:], stderr[-3000:]
        assert re.fullmatch(
            re.escape(
                f"train.main: error: --model_dir={model_dir} is in use by another "
                f"run (pid {holder.pid} on host {socket.gethostname()} (since "
            )
            + r"[^)]+"
            + re.escape(
                f"); lock file {held}): wait for it to end, or give another --model_dir"
            ),
            errors[0],
        ), errors[0]
    assert after == before


def test_a_cluster_on_a_folder_another_run_holds_ends_in_one_line_per_worker(
    tmp_path,
):
    """The chief is refused the folder's lock (exit 2); worker 1, waiting for
    it in the set-up's first collective, is told its peer is gone (exit 3)."""
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    holder = _start_lock_holder(model_dir)
    workers = []
    try:
        assert holder.stdout.readline() == "held\n"
        args = ["--train_steps=20"] + [f"--{k}={v}" for k, v in TINY.items()]
        workers = helpers.start_workers(
            model_dir, helpers.local_worker_addresses(2), args
        )
        outputs = [process.communicate(timeout=300) for process in workers]
    finally:
        for process in [holder] + workers:
            process.kill()
            process.wait()
    lines = []
    for process, (_, stderr) in zip(workers, outputs, strict=True):
        assert "Traceback" not in stderr, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if "train.main" in line]
        assert errors == stderr.splitlines()[-1:], stderr[-3000:]
        lines.append((process.returncode, errors[0]))
    assert lines[0][0] == 2 and "is in use by another run" in lines[0][1]
    assert lines[1][0] == 3 and re.search(r"worker 0 \(.*\) unreachable", lines[1][1])
    assert sorted(os.listdir(model_dir)) == [model_folder.LOCK_FILE]


def test_a_lock_is_exclusive_per_name_and_released(tmp_path):
    """The chief holds the folder's lock, each other worker its own."""
    chief = model_folder.lock(str(tmp_path))
    worker = model_folder.lock(str(tmp_path), "workertemp_worker_1.lock")
    with pytest.raises(UserError, match="is in use by another run"):
        model_folder.lock(str(tmp_path))
    chief.release()
    worker.release()
    assert os.listdir(tmp_path) == []
    model_folder.lock(str(tmp_path)).release()


def test_each_worker_holds_its_part_of_the_folder(tmp_path):
    """Under multi_worker a worker other than the chief holds the lock of its
    temporary checkpoint folder: a second cluster's worker 1 is refused."""
    c = _config(tmp_path, train_steps=2)
    resolver = types.SimpleNamespace(task_type="worker", task_id=1)
    strategy = types.SimpleNamespace(cluster_resolver=resolver)
    model_folder.prepare(c, False, strategy)
    try:
        assert os.listdir(tmp_path) == ["workertemp_worker_1.lock"]
        with pytest.raises(UserError, match="workertemp_worker_1.lock"):
            model_folder.lock(str(tmp_path), "workertemp_worker_1.lock")
        model_folder.lock(str(tmp_path)).release()  # The chief's is free.
    finally:
        model_folder.release()
    assert os.listdir(tmp_path) == []


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last(
    tmp_path, monkeypatch, capfd
):
    """The disk fills during the save of ckpt-4 (as on a full tmpfs: TF raises
    ResourceExhaustedError and leaves ckpt-4_temp/); as root, an unwritable
    folder cannot be made with chmod, so the save is made to fail here."""
    model_dir = tmp_path / "run"
    real_save = tf.train.CheckpointManager.save

    def full_disk_save(manager, checkpoint_number=None, **kwargs):
        if checkpoint_number == 4:
            temp = model_dir / "ckpt-4_temp"
            temp.mkdir()
            raise tf.errors.ResourceExhaustedError(
                None, None, f"{temp}/part-00000-of-00001; No space left on device"
            )
        return real_save(manager, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", full_disk_save)
    c = _config(model_dir, train_steps=6, checkpoint_every_steps=2)
    with pytest.raises(RunError) as error:
        trainer.run(c)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"could not write checkpoint ckpt-4 in {model_dir}")
    assert "No space left on device" in message
    assert message.endswith(f"the last checkpoint, {model_dir / 'ckpt-2'}, is intact")
    assert tf.train.latest_checkpoint(str(model_dir)) == str(model_dir / "ckpt-2")
    assert _step_of(str(model_dir / "ckpt-2")) == 2
    assert not (model_dir / trainer.SUMMARY_FILE).exists()

    monkeypatch.setattr(tf.train.CheckpointManager, "save", real_save)
    capfd.readouterr()
    summary = trainer.run(c)  # With space again: resumes, after cleaning up.
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6
    assert f"removed {model_dir / 'ckpt-4_temp'}" in capfd.readouterr().err
    assert not (model_dir / "ckpt-4_temp").exists()


def test_a_failed_json_write_is_one_line(tmp_path):
    path = tmp_path / "gone" / trainer.SUMMARY_FILE  # Its folder is missing.
    with pytest.raises(RunError) as error:
        config.write_json(str(path), {"steps": 1})
    assert str(error.value) == f"could not write {path}: No such file or directory"


def test_a_failed_export_is_one_line_and_a_rerun_exports(tmp_path, monkeypatch):
    """The disk fills while model.keras is written: one line naming the file,
    no summary.json (the run is not finished), and a rerun with space exports
    the model from the final checkpoint."""
    model_dir = tmp_path / "run"
    real_save = keras.Model.save

    def full_disk_save(model, filepath, *args, **kwargs):
        with open(filepath, "wb") as file:
            file.write(b"PK")  # Half a zip file, as a full disk leaves it.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(keras.Model, "save", full_disk_save)
    c = _config(model_dir, train_steps=2, checkpoint_every_steps=2)
    with pytest.raises(RunError) as error:
        trainer.run(c)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"could not write {model_dir / trainer.MODEL_FILE}: No space left on device"
    )
    assert sorted(p.name for p in model_dir.glob("*.keras")) == []
    assert not (model_dir / trainer.SUMMARY_FILE).exists()

    monkeypatch.setattr(keras.Model, "save", real_save)
    summary = trainer.run(c)
    assert summary["steps"] == 2 and summary["resumed_from_step"] == 2
    assert keras.saving.load_model(str(model_dir / trainer.MODEL_FILE)).built
