"""MLflow bookkeeping for a training run: tags, per-epoch metrics, figures."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import keras
import mlflow

REPO_DIR = Path(__file__).resolve().parents[3]
TRACKED_PACKAGES = ("spinemri", "tensorflow", "keras", "mlflow", "numpy", "pandas", "scikit-learn", "pydicom",
                    "opencv-python-headless")
# What the logged model needs to run (its own package travels as code).
MODEL_REQUIREMENTS = ("tensorflow", "keras", "mlflow", "numpy", "pandas", "scikit-learn", "pydicom", "pylibjpeg",
                      "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "opencv-python-headless", "pyyaml",
                      "click", "tqdm")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"{len(gpus)} GPU(s): " + ", ".join(g.name for g in gpus)
    return f"CPU ({platform.processor() or platform.machine()})"


def run_tags(fingerprint: str, arch: str, task: str) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "data_fingerprint": fingerprint,
        "device": device_description(),
        "arch": arch,
        "task": task,
        "python": platform.python_version(),
    }
    tags.update({f"version.{name}": package_version(name) for name in TRACKED_PACKAGES})
    return tags


def pip_requirements() -> list[str]:
    return [f"{name}=={package_version(name)}" for name in MODEL_REQUIREMENTS
            if package_version(name) != "not installed"]


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every Keras epoch metric (train and validation) and the learning rate to the active run."""

    def __init__(self, step_offset: int = 0):
        super().__init__()
        self.step_offset = step_offset

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        try:
            metrics["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        except (AttributeError, TypeError, ValueError):
            pass
        mlflow.log_metrics(metrics, step=epoch + self.step_offset)


def log_figure(figure, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, path)
    plt.close(figure)
