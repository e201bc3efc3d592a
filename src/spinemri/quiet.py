"""What spinemri keeps out of the terminal: lines from libraries that tell a spinemri user nothing.

    quiet_libraries()   MLflow's INFO lines and artifact progress bars, and the log records spinemri cannot
                        prevent where they arise (each named below with why)
    start_tensorflow()  TensorFlow imported and its devices listed; on a machine without an NVIDIA GPU its
                        start-up lines about missing CUDA drivers are dropped where C++ writes them, file
                        descriptor 2 (every other line passes, in order)
    quietly(target)     a spawned process's entry point: start_tensorflow(), then the target imported and run

Every command calls :func:`quiet_libraries` when it starts; the commands that fit or run a model call
:func:`start_tensorflow` once their settings are checked.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
import re
import sys
import threading
from typing import Iterator

# C++ start-up lines of a TensorFlow build with CUDA on a machine with no NVIDIA driver or device.
NO_GPU_LINES = re.compile(r"cudart_stub\.cc|cuda_platform\.cc|failed call to cuInit|Could not find cuda drivers|"
                          r"absl::InitializeLog\(\) is called|Unable to register cu(DNN|FFT|BLAS) factory|"
                          r"computation_placer\.cc|cuda_executor\.cc|TF-TRT Warning")

# MLflow's lines on registering a version, printed rather than logged; spinemri's decision line names the version.
REGISTRATION_LINES = re.compile(r"^(Successfully registered model '|Created version '|Registered model '.*' already exists)")

# (logger, text): log records spinemri cannot prevent, dropped by their text.
DROPPED_RECORDS = (
    # a served model is an object of spinemri's own classes, logged with the package as its code
    ("mlflow.pyfunc", "serialized using CloudPickle"),
    # Keras traces a predict function per input shape; evaluation predicts splits of varying sizes
    ("tensorflow", "triggered tf.function retracing"),
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries() -> None:
    """MLflow logs warnings and errors only, without progress bars; the records above are dropped."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own INFO and WARNING lines
    for name, text in DROPPED_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))


def has_nvidia_gpu() -> bool:
    """Whether this machine shows an NVIDIA device (Linux's /dev/nvidia0, ...); macOS has none."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


@contextlib.contextmanager
def stderr_without(drop: re.Pattern) -> Iterator[None]:
    """Within the block, lines written to file descriptor 2 (by Python or C++) that ``drop`` matches are dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not drop.search(line.decode("utf-8", "replace")):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the pump reads to its end and stops
        thread.join(timeout=10)
        os.close(saved)


def quietly(target: str, *args) -> None:
    """The entry point of a spawned process that trains: TensorFlow started quietly (:func:`start_tensorflow`),
    then ``target`` ("package.module:function", imported only now, with everything it imports) called."""
    start_tensorflow()
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(*args)


def start_tensorflow() -> None:
    """Import TensorFlow and list its devices (where CUDA start-up speaks), quietly on a machine without a GPU."""
    quiet_libraries()
    filtered = "tensorflow" not in sys.modules and not has_nvidia_gpu()
    with stderr_without(NO_GPU_LINES) if filtered else contextlib.nullcontext():
        import tensorflow as tf

        tf.config.list_physical_devices()
