"""tf.data service: hand the input pipeline's work to other processes or hosts.

A tf.data service cluster is one dispatcher and any number of workers. The
trainer sends its dataset's definition to the dispatcher; the workers run it and
stream the finished batches back, so JPEG decoding and augmentation run on the
workers' CPUs instead of the training host's.

Start the dispatcher once (it prints its address), then one or more workers on
any hosts that can reach it::

    python -m train.data_service --port=5050
    python -m train.data_service --port=5051 --dispatcher=HOST0:5050 \\
        --worker_address=HOST1:5051

``--worker_address`` is the name under which trainers reach this worker
(default ``localhost:<port>``, right only when trainer and worker share a host).
Both run until SIGTERM or SIGINT. The trainer then reads through the cluster
with ``distribute(dataset, "grpc://HOST0:5050", job_name)``. The workers need
the dataset's files at the same paths as the trainer (a shared or copied
folder).

Sharding (``distribute``): the dispatcher splits the dataset at its sources
(the record files of ``train.data``'s pipelines; the elements of a
``Dataset.range`` or ``from_tensor_slices``) and hands the splits to workers as
they ask for more (``ShardingPolicy.DYNAMIC``). Without failures every split is
read by exactly one worker, once per epoch of the source, so every example is
seen exactly once per epoch; a faster worker simply takes more splits. Element
order is not deterministic. A worker that fails loses the rest of the splits it
held for that epoch (no example is repeated, some are missed).
"""

import signal
import sys
import threading
from typing import TYPE_CHECKING

from absl import app, flags

from train import FlagError

if TYPE_CHECKING:  # TensorFlow is imported on use: bad flags fail at once.
    import tensorflow as tf

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined only when run as a command, so that
    importing ``distribute`` beside ``train.main`` (one process) is safe."""
    flags.DEFINE_integer(
        "port", None, "Port to listen on (required; 0 picks a free port)."
    )
    flags.DEFINE_string(
        "dispatcher",
        None,
        "HOST:PORT of the dispatcher: start a worker for it. Without this flag, "
        "start a dispatcher.",
    )
    flags.DEFINE_string(
        "worker_address",
        None,
        "HOST:PORT under which trainers reach this worker (workers only); "
        "default localhost:<port>.",
    )


def parse_address(flag: str, address: str) -> str:
    """``address`` as HOST:PORT (a ``grpc://`` prefix is dropped); a FlagError
    naming ``flag`` when it is not of that form. Imports no TensorFlow."""
    address = address.removeprefix("grpc://")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FlagError(
            flag, f"must be HOST:PORT with a port in 1-65535, got {address!r}"
        )
    return address


def validate_flags(f: flags.FlagValues) -> None:
    """Raises FlagError for a missing or malformed flag."""
    if f.port is None:
        raise FlagError("port", "is required (0 picks a free port)")
    if not 0 <= f.port < 65536:
        raise FlagError("port", f"must be in 0-65535, got {f.port}")
    if f.dispatcher is not None:
        parse_address("dispatcher", f.dispatcher)
    if f.worker_address is not None:
        if f.dispatcher is None:
            raise FlagError("worker_address", "applies to workers (with --dispatcher)")
        parse_address("worker_address", f.worker_address)


def start_server(
    port: int, dispatcher: str | None = None, worker_address: str | None = None
):
    """A started dispatcher (``dispatcher`` None) or worker of that dispatcher.

    Returns (server, line): the line says what listens where. A worker has
    registered with its dispatcher when this returns.
    """
    import tensorflow as tf

    service = tf.data.experimental.service
    if dispatcher is None:
        server = service.DispatchServer(service.DispatcherConfig(port=port))
        return server, f"tf.data service dispatcher at {server.target}"
    server = service.WorkerServer(
        service.WorkerConfig(
            dispatcher_address=parse_address("dispatcher", dispatcher),
            worker_address=worker_address,
            port=port,
        )
    )
    address = worker_address or f"localhost:{server._address.rpartition(':')[2]}"
    return server, f"tf.data service worker at {address}, dispatcher {dispatcher}"


def distribute(
    dataset: "tf.data.Dataset", service_address: str, job_name: str | None = None
) -> "tf.data.Dataset":
    """``dataset`` produced by the tf.data service at ``service_address``.

    Args:
      dataset: the dataset to run on the workers; every file it reads must be
        readable at the same path on every worker.
      service_address: the dispatcher, ``grpc://HOST:PORT`` or ``HOST:PORT``.
      job_name: readers with the same job name share one job, each getting a
        part of its elements; give each input pipeline its own name when the
        pipelines differ (e.g. each reads its own share of the files). None:
        a job of this reader alone, ended when its iterator is.

    Returns:
      The elements of ``dataset``, with ``ShardingPolicy.DYNAMIC`` sharding
      (module docstring): each source split once per epoch, spread over the
      workers on demand, in no fixed order.
    """
    import tensorflow as tf

    service = tf.data.experimental.service
    address = service_address.removeprefix("grpc://")
    parse_address("data_service", address)
    return dataset.apply(
        service.distribute(
            processing_mode=service.ShardingPolicy.DYNAMIC,
            service=f"grpc://{address}",
            job_name=job_name,
        )
    )


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but any error is one line on stderr and exit status 2."""
    try:
        remaining = FLAGS(argv)
        validate_flags(FLAGS)
    except (flags.Error, FlagError) as error:
        print(f"train.data_service: error: {error}", file=sys.stderr)
        sys.exit(2)
    return remaining


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.dispatcher:
        print(
            f"tf.data service worker: registering with the dispatcher at "
            f"{FLAGS.dispatcher} (TF retries for up to an hour)",
            flush=True,
        )
    # Until the server is up, SIGTERM and SIGINT end the process at once:
    # Python handlers would wait for the blocking start to return.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    server, line = start_server(FLAGS.port, FLAGS.dispatcher, FLAGS.worker_address)
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    print(line, flush=True)  # Callers wait for this line: the server is up.
    stop.wait()
    server.stop()


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=_parse_flags)
