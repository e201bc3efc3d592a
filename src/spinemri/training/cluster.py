"""One model trained by several machines (``train.strategy: multiworker``): the cluster that TF_CONFIG
describes, joining it, checking that every worker trains on the same data, and naming a worker that
stops responding.

Every machine runs the same ``spinemri train ... --strategy multiworker`` with its own TF_CONFIG
(the same ``cluster.worker`` list, its own ``task.index``). Worker 0 is the chief: only it logs to
MLflow. The workers build the same global batches from the same seed, and each reads only the images of
its own replicas (:func:`distribute`); the gradients are summed over all workers at every step,
so every worker ends with the same weights (:func:`spinemri.training.fit.weights_digest` shows it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np
import tensorflow as tf

from spinemri.errors import ConfigError, DatasetError, TrainingError
from spinemri.training.data import SplitData

TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host0:23456", "host1:23456"]}, '
                     '"task": {"type": "worker", "index": 0}}\'')
_SETUP = (f"set it on every machine, with the same cluster.worker list and the machine's own task.index "
          f"(0 on the chief), e.g. {TF_CONFIG_EXAMPLE}")


@dataclass(frozen=True)
class Cluster:
    """The workers of one multi-worker training, as TF_CONFIG lists them, and this process's place among them."""

    workers: tuple[str, ...]  # host:port of each worker; the index in this tuple is its task index
    index: int

    @property
    def is_chief(self) -> bool:
        """Worker 0: the one that logs the run, the model and its registration."""
        return self.index == 0

    @property
    def address(self) -> str:
        return self.workers[self.index]

    def others(self) -> list[str]:
        return [w for i, w in enumerate(self.workers) if i != self.index]


def read_cluster(environ: Mapping[str, str] = os.environ) -> Cluster:
    """The cluster in the TF_CONFIG environment variable, checked: only ``worker`` tasks, each a distinct
    host:port, and this process's ``task`` among them."""
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise ConfigError(f"train.strategy=multiworker reads the cluster from the TF_CONFIG environment variable, "
                          f"which is not set; {_SETUP}")
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({exc}); {_SETUP}") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    workers = cluster.get("worker") if isinstance(cluster, dict) else None
    if not isinstance(workers, list) or not workers:
        raise ConfigError(f"TF_CONFIG has no cluster.worker list (the host:port of every machine); {_SETUP}")
    jobs = sorted(set(cluster) - {"worker"})
    if jobs:
        raise ConfigError(f"TF_CONFIG's cluster has {', '.join(jobs)} besides worker; spinemri's machines are all "
                          f"workers and worker 0 is the chief: list every machine in cluster.worker")
    for address in workers:
        host, _, port = str(address).rpartition(":")
        if not (isinstance(address, str) and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"TF_CONFIG's cluster.worker has {address!r}, not a host:port; {_SETUP}")
    if len(set(workers)) < len(workers):
        raise ConfigError(f"TF_CONFIG's cluster.worker lists an address twice ({', '.join(workers)}); give every "
                          "worker its own host:port")
    task = spec.get("task")
    index = task.get("index") if isinstance(task, dict) else None
    if not isinstance(task, dict) or task.get("type") != "worker" or isinstance(index, bool) \
            or not isinstance(index, int) or not 0 <= index < len(workers):
        raise ConfigError(f"TF_CONFIG's task must be {{\"type\": \"worker\", \"index\": i}} with i from 0 to "
                          f"{len(workers) - 1}, this machine's place in cluster.worker; got {task!r}")
    return Cluster(tuple(workers), index)


class _KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy with the ``reduce`` Keras 3's fit calls on it.

    Keras 3 reduces a whole nested batch in one call before the first step, and each scalar metric
    "over axis 0" at every step; this strategy's collective reduce takes one tensor at a time and
    needs an axis the tensor has. Here each tensor of the structure is reduced alone, a scalar over
    the replicas only. ``tf.distribute.MirroredStrategy`` accepts both forms as they are.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super().reduce

        def one(tensor):
            rank = self.experimental_local_results(tensor)[0].shape.rank
            return parent(reduce_op, tensor, axis if rank else None)

        return tf.nest.map_structure(one, value)


_joined: tuple[Cluster, tf.distribute.Strategy] | None = None


def join(cluster: Cluster, timeout_s: float) -> tf.distribute.Strategy:
    """The MultiWorkerMirroredStrategy of ``cluster``, made once per process.

    TensorFlow lets a process join a cluster only before it has run any other operation, so the
    training calls this first. The call returns once every worker has joined; if they have not all
    joined within ``timeout_s`` seconds, the process is ended with a message saying so (before any
    MLflow run exists). Each collective operation of the training then fails after ``timeout_s``
    seconds without its peers.
    """
    global _joined
    if _joined is not None:
        if _joined[0] != cluster:
            raise ConfigError(f"this process already joined the cluster {', '.join(_joined[0].workers)} as worker "
                              f"{_joined[0].index}; train another cluster in a new process")
        return _joined[1]
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=float(timeout_s))
    gave_up = (f"Error: worker {cluster.index} ({cluster.address}) waited train.worker_timeout_s={timeout_s:g} s for "
               f"the other workers of {', '.join(cluster.workers)} to join; start the same `spinemri train ... "
               f"--strategy multiworker` on every machine of TF_CONFIG's cluster.worker, each with its own task.index, "
               f"or raise train.worker_timeout_s")
    try:
        with _ended_after(timeout_s, gave_up):
            strategy = _KerasMultiWorkerStrategy(communication_options=options)
    except tf.errors.OpError as exc:  # e.g. "Could not start gRPC server"
        raise ConfigError(f"worker {cluster.index} could not join the cluster as {cluster.address} "
                          f"({exc.message.strip().splitlines()[0]}): its port is taken, or the host is not this "
                          f"machine's; give this machine a free host:port in TF_CONFIG's cluster.worker") from None
    except RuntimeError as exc:
        if "startup" not in str(exc):
            raise
        raise ConfigError("train.strategy=multiworker must join its cluster before TensorFlow runs anything else in "
                          "the process; run the training in a process of its own (spinemri train ...)") from None
    # TensorFlow's cluster runtime takes SIGTERM over to note a preemption, which nothing here reads:
    # give it back, so that `kill` ends a worker (or the chief's run, KILLED) as it ends any command.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _joined = (cluster, strategy)
    return strategy


_WATCHDOG = """
import os, select, signal, sys
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], seconds)[0]:  # neither done nor gone within the time
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(parent, signal.SIGKILL)
"""


@contextlib.contextmanager
def _ended_after(seconds: float, message: str) -> Iterator[None]:
    """Inside, this process is killed after ``seconds`` with ``message`` on stderr, by a small process
    of its own: TensorFlow's wait for the cluster holds the interpreter lock, so neither a thread nor
    a signal handler of this process would run before it returns (and TensorFlow ignores SIGTERM)."""
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
                                stdin=subprocess.PIPE)
    try:
        yield
    finally:
        watchdog.stdin.close()  # done: it sees the end of its input and leaves
        watchdog.wait()


def joined() -> tuple[Cluster, tf.distribute.Strategy]:
    """The cluster this process joined and its strategy (:func:`join` comes first)."""
    if _joined is None:
        raise RuntimeError("multiworker training: join(read_cluster(), ...) must come before the model is built")
    return _joined


def distribute(strategy: tf.distribute.Strategy,
               make_dataset: Callable[[tuple[int, int] | None], tf.data.Dataset]):
    """The input of ``model.fit`` under ``strategy``.

    ``make_dataset(replica_batches)`` builds global batches; under MultiWorkerMirroredStrategy it is
    called once per worker with (first, count), this worker's replicas, and yields only their batches
    (:func:`spinemri.training.data.make_dataset`), so that no worker reads another's images.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return make_dataset(None)

    def this_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = context.num_replicas_in_sync // context.num_input_pipelines
        return make_dataset((context.input_pipeline_id * local, local))

    return strategy.distribute_datasets_from_function(this_worker)


def average_statistics(strategy: tf.distribute.Strategy, model) -> None:
    """Set every replica's copy of ``model``'s floating-point non-trainable weights (BatchNormalization's
    moving mean and variance) to their mean over all replicas.

    Keras 3 updates those on each replica from its own batches alone, so each worker would end with
    statistics of its own shard; the trainable weights are equal everywhere already. Call in
    ``strategy.scope()``; one exchange between the workers.
    """
    variables = [v for v in model.non_trainable_weights if v.dtype.startswith(("float", "bfloat"))]
    if not variables:
        return

    def to_mean():
        means = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])
        for variable, mean in zip(variables, means):
            variable.assign(mean)  # aggregation none: this replica's copy

    strategy.run(tf.function(to_mean))


def data_digest(content_digest: str, splits: Mapping[str, SplitData]) -> str:
    """sha256 (hex) of what the batches are made of: the cache's content and the training and validation
    rows with their targets."""
    digest = hashlib.sha256(content_digest.encode())
    for name in ("train", "val"):
        split = splits[name]
        digest.update(name.encode() + np.ascontiguousarray(split.rows).tobytes())
        for head in sorted(split.targets):
            digest.update(head.encode() + np.ascontiguousarray(split.targets[head]).tobytes())
    return digest.hexdigest()


def check_same_data(strategy: tf.distribute.Strategy, cluster: Cluster, digest: str, timeout_s: float) -> None:
    """Refuse to train unless every worker has the same :func:`data_digest`: workers with other data would
    step through other samples, in another number of steps. The first exchange between the workers: it
    waits (up to ``timeout_s``) for the slowest to have its data ready."""
    own = np.frombuffer(bytes.fromhex(digest), dtype=np.uint16).astype(np.float32)  # exact in float32
    with naming_stopped_workers(cluster, timeout_s):
        every = strategy.gather(strategy.experimental_distribute_values_from_function(lambda _: tf.constant(own)),
                                axis=0)
    rows = np.asarray(every).reshape(strategy.num_replicas_in_sync, -1)
    local = strategy.num_replicas_in_sync // len(cluster.workers)
    differ = [cluster.workers[i] for i in range(len(cluster.workers)) if not np.array_equal(rows[i * local], own)]
    if differ:
        raise DatasetError([f"worker(s) {', '.join(differ)} prepared other training data than worker {cluster.index} "
                            f"({cluster.address}): every worker must read the same dataset, with the same "
                            "preprocessing and split settings (a copy of its own and its own cache are fine)"])


_TASK = re.compile(r"/job:worker/(?:replica:\d+/)?task:(\d+)")
_PEER_LOST = (tf.errors.UnavailableError, tf.errors.FailedPreconditionError, tf.errors.AbortedError,
              tf.errors.CancelledError, tf.errors.InternalError)


def stopped_worker(error: Exception, cluster: Cluster, timeout_s: float) -> str | None:
    """The message for a TensorFlow error that means another worker stopped responding, naming it; None
    for any other error. A killed or crashed worker stops sending heartbeats and TensorFlow aborts the
    collective operations of the others; a stuck one lets a collective operation time out."""
    if not isinstance(error, tf.errors.OpError):
        return None
    text = str(error)
    if isinstance(error, tf.errors.DeadlineExceededError) and "collective" in text.lower():
        tasks, why = [], (f"this worker waited train.worker_timeout_s={timeout_s:g} s for it (stuck, still preparing "
                          "its data, or much slower than the others; raise train.worker_timeout_s if it is only slow)")
    elif isinstance(error, _PEER_LOST) and re.search("collective|coordination|heartbeat", text, re.IGNORECASE):
        tasks = sorted({int(task) for task in _TASK.findall(text)} - {cluster.index})
        lost_chief = "leader task" in text and not cluster.is_chief  # the coordination service runs on the chief
        if lost_chief and not tasks:
            tasks = [0]
        if "stopped sending heartbeats" in text:
            why = "it stopped sending heartbeats (killed, crashed or cut off)"
        elif lost_chief:
            why = "the cluster's coordination service on it stopped answering (killed, crashed or cut off)"
        else:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            why = "TensorFlow: " + next((line for line in lines if "aborted" in line), lines[0])[:300]
    else:
        return None
    named = [cluster.workers[t] for t in tasks if t < len(cluster.workers)]
    suspects = named or cluster.others()
    if len(suspects) == 1:
        who = f"worker {suspects[0]}" + (" (the chief)" if suspects[0] == cluster.workers[0] else "")
    elif named:
        who = f"workers {', '.join(named)}"
    else:
        who = f"one of the workers {', '.join(suspects)}"
    return (f"{who} stopped responding: {why}. The multi-worker training stopped; start every worker again "
            "to train")


@contextlib.contextmanager
def naming_stopped_workers(cluster: Cluster, timeout_s: float) -> Iterator[None]:
    """Inside, a TensorFlow error that means a worker stopped responding becomes a TrainingError naming it."""
    try:
        yield
    except tf.errors.OpError as exc:
        message = stopped_worker(exc, cluster, timeout_s)
        if message is None:
            raise
        raise TrainingError(message) from None
