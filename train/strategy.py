"""The run's place among devices and workers: the strategy, whether this
process is the chief, the stop signals all workers agree on, and the one line
a lost worker ends the run with.

SIGTERM (preemption) and SIGINT (Ctrl-C) ask the run to stop at the next loop
boundary, after a checkpoint, with exit status 128 + the signal (143, 130); a
second SIGINT ends the process at once. TensorFlow's
`tf.distribute.experimental.PreemptionCheckpointHandler` is not used: it
watches SIGTERM only and, outside Google's own TPU hosts, does not support
TPUStrategy (on a Cloud TPU or CPU VM it only warns).
"""

import contextlib
import functools
import os
import re
import signal
import sys
import threading
from collections.abc import Callable

import tensorflow as tf

from train import RunError
from train.config import Config

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def make_strategy(config: Config) -> tf.distribute.Strategy:
    """The strategy of `--strategy`, after splitting the CPU if asked.

    Must run before TensorFlow touches a device (logical devices are fixed
    from then on); hence one strategy per process.
    """
    if config.num_cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * config.num_cpu_devices
        )
    if config.strategy == "one_device":
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if config.strategy == "mirrored":
        devices = None  # All GPUs, else the CPU.
        if config.num_cpu_devices and not tf.config.list_physical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if config.strategy == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        # Its coordination service installs a SIGTERM handler of its own (for
        # PreemptionCheckpointHandler, unused here) that swallows the signal:
        # SIGTERM goes back to the handler Python had (`StopSignals`').
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))
        return strategy
    if config.strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints, summaries and logs."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


class StopSignals:
    """While entered: SIGINT and SIGTERM set `received` (the first one's
    number), to be acted on at the next loop boundary; a second SIGINT writes
    one line on stderr and ends the process at once, status 130.

    Python runs a signal handler only between bytecodes, so not while a
    training loop runs in TensorFlow; the second SIGINT is therefore caught
    through `signal.set_wakeup_fd` by a thread, which TensorFlow's calls (they
    release the GIL) let run. Leaving restores the previous handlers.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Signals reach the main thread only.
        for signum in STOP_SIGNALS:
            # An ignored signal stays ignored (a shell's background job
            # starts with SIGINT ignored, `nohup` with SIGHUP).
            if signal.getsignal(signum) != signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._write_fd)  # The watching thread reads EOF and ends.
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        if self.received is None:
            self.received = signum

    def _watch(self, read_fd: int) -> None:
        """Announces the first stop signal as it arrives, even mid-loop, and
        ends the process on the second SIGINT."""
        announced, interrupts = False, 0
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while byte := pipe.read(1):
                signum = byte[0]
                interrupts += signum == signal.SIGINT
                if interrupts == 2:
                    _write_stderr("SIGINT again: exiting now, without a checkpoint.")
                    os._exit(128 + signal.SIGINT)
                if signum in STOP_SIGNALS and not announced:
                    announced = True
                    _write_stderr(
                        f"{signal.Signals(signum).name}: stopping after a checkpoint "
                        f"at the end of this loop (exit status {128 + signum})"
                        + ("; SIGINT again exits now." if interrupts else ".")
                    )


def _write_stderr(line: str) -> None:
    """One line on stderr, flushing stdout first so the lines keep their order."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (OSError, ValueError):  # A stderr without a file (captured).
        sys.stderr.write(line + "\n")


def stop_signal(strategy: tf.distribute.Strategy, received: int | None) -> int | None:
    """The signal that stops the run, the same on every worker (all must stop
    at the same step): SIGTERM if any worker got it, else SIGINT if any did."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return received
    flags = tf.constant([float(received == s) for s in STOP_SIGNALS])
    got_int, got_term = _summed_over_workers(strategy)(flags).numpy() > 0
    return signal.SIGTERM if got_term else (signal.SIGINT if got_int else None)


@functools.cache
def _summed_over_workers(strategy: tf.distribute.Strategy) -> Callable:
    """A traced sum over the replicas of a value each worker gives (run
    eagerly, the collective logs an overhead warning at every call)."""

    @tf.function
    def summed(value: tf.Tensor) -> tf.Tensor:
        per_replica = strategy.run(tf.identity, args=(value,))
        return strategy.reduce("SUM", per_replica, axis=None)

    return summed


# How a collective fails when a worker is lost: its connection reset (the
# worker was killed) or the coordination service's report that it stopped
# sending heartbeats (it hangs, or its host is gone), within seconds either way.
_LOST_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)


@contextlib.contextmanager
def lost_peer_reported(strategy: tf.distribute.Strategy, model_dir: str):
    """While entered, under MultiWorkerMirroredStrategy, a collective that fails
    because a worker is lost raises `train.RunError` in one line: the worker,
    and the checkpoint all workers resume from once restarted."""
    try:
        yield
    except _LOST_PEER_ERRORS as error:
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise
        raise RunError(_lost_peer_line(strategy, error, model_dir)) from None


def _lost_peer_line(
    strategy: tf.distribute.Strategy, error: tf.errors.OpError, model_dir: str
) -> str:
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict()
    tasks = re.findall(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)", error.message)
    peers = [
        (job, int(index))
        for job, index in tasks
        if (job, int(index)) != (resolver.task_type, resolver.task_id)
        and int(index) < len(cluster.get(job, []))
    ]
    who = "a peer worker"
    if peers:
        job, index = peers[0]
        who = f"{job} {index} ({cluster[job][index]})"
    reason = type(error).__name__
    for cause in ("stopped sending heartbeats", "Connection reset by peer"):
        if cause in error.message:
            reason = cause
    latest = tf.train.latest_checkpoint(model_dir)
    resume = f"resume from {latest}" if latest else "start over (no checkpoint yet)"
    return f"{who} unreachable ({reason}); restart all workers to {resume}"
