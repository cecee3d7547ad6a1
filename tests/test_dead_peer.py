"""A `multi_worker` peer killed mid-run: the survivor ends with one line.

Two local workers train on synthetic data; once the chief has logged step 40
(so ckpt-20 at least is written), worker 1 is killed with SIGKILL. The survivor
must exit with status 3 and one line naming the lost worker and the checkpoint
to resume from, without a traceback (after TensorFlow's own log, which
TF_CPP_MIN_LOG_LEVEL=3 silences); both workers restarted then resume from
that checkpoint, and stop on SIGTERM after a checkpoint (status 143).
"""

import os
import re
import signal
import subprocess

import helpers

ARGS = [
    "--source=synthetic",
    "--num_classes=10",
    "--image_size=16",
    "--model=small_alexnet_bn",
    "--global_batch_size=32",
    "--warmup_epochs=0",
    "--train_steps=100000",  # Far more than either run gets to.
    "--steps_per_loop=10",
    "--log_every_steps=20",
    "--checkpoint_every_steps=20",
    "--skip_eval",
]
TIMEOUT = 300  # Seconds; a hung collective must not hang the suite.


def _start_workers(model_dir, workers: list[str]) -> list[subprocess.Popen]:
    return helpers.start_workers(model_dir, workers, ARGS)


def test_a_killed_peer_ends_the_survivor_in_one_line_and_all_resume(tmp_path):
    model_dir = tmp_path / "run"
    workers = helpers.local_worker_addresses(2)
    chief, peer = _start_workers(model_dir, workers)
    try:
        helpers.read_until(chief, r"train step +40/")
        peer.send_signal(signal.SIGKILL)
        peer.wait(timeout=TIMEOUT)
        _, stderr = chief.communicate(timeout=TIMEOUT)
    finally:
        for process in (chief, peer):
            process.kill()
    assert chief.returncode == 3, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    # Ours is the last line; TensorFlow's C++ log (TF_CPP_MIN_LOG_LEVEL) may
    # come before it.
    errors = [line for line in stderr.splitlines() if line.startswith("train.main")]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr[-3000:]
    found = re.fullmatch(
        rf"train\.main: error: worker 1 \({workers[1]}\) unreachable \(.+\); "
        r"restart all workers to resume from (\S+/ckpt-(\d+))",
        errors[0],
    )
    assert found, errors[0]
    checkpoint, step = found.group(1), int(found.group(2))
    assert step >= 20 and os.path.exists(checkpoint + ".index")

    restarted = _start_workers(model_dir, workers)
    try:
        lines = helpers.read_until(restarted[0], r"train step ")
        for process in restarted:  # Reaches them under multi_worker too.
            process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=TIMEOUT) for process in restarted]
    finally:
        for process in restarted:
            process.kill()
    for process, (_, stderr) in zip(restarted, outputs, strict=True):
        assert process.returncode == 143, stderr[-3000:]
    assert f"resumed at step {step} from {checkpoint}" in "".join(lines)
    assert "SIGTERM: saved a checkpoint at step" in outputs[0][0]
