"""What every benchmark shares: the machine description, phantom data, a private MLflow store, output.

Each benchmark prints exactly two lines on stdout — one JSON object with every raw number, the
ratio, its target, pass/miss and the machine, then a one-line human summary — and sends
everything else (training logs, TensorFlow's chatter) to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark this checkout, whatever is installed
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def work_dir() -> Path:
    """Phantoms live here between runs (same studies and seed, same files): $SPINEMRI_BENCH_DIR,
    else ~/.cache/spinemri/bench."""
    folder = Path(os.environ.get("SPINEMRI_BENCH_DIR") or Path.home() / ".cache" / "spinemri" / "bench")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def phantom(studies: int, seed: int = 0) -> Path:
    """A phantom dataset of ``studies`` studies, synthesised once into the work dir."""
    from spinemri.phantom import PhantomConfig, synthesize

    out = work_dir() / f"phantom-{studies}-seed{seed}"
    if not (out / "train.csv").is_file():
        log(f"synthesising a {studies}-study phantom into {out} (once)")
        synthesize(out, PhantomConfig(studies=studies, seed=seed), workers=min(4, os.cpu_count() or 1),
                   overwrite=True)
    return out


@contextlib.contextmanager
def private_store():
    """A fresh sqlite MLflow store and preprocessed-cache folder; yields the temp folder.

    The working directory moves there too: a sqlite store puts run artifacts under ./mlruns.
    """
    keys = ("MLFLOW_TRACKING_URI", "SPINEMRI_CACHE_DIR", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
    saved = {k: os.environ.get(k) for k in keys}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="spinemri-bench-") as tmp:
        os.chdir(tmp)
        os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", SPINEMRI_CACHE_DIR=f"{tmp}/cache")
        os.environ.pop("MLFLOW_RUN_ID", None)
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        import mlflow

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        try:
            yield Path(tmp)
        finally:
            os.chdir(cwd)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# Linux keeps a process's peak-RSS mark across fork and exec, so a child forked straight from a
# big process reports at least that process's size. A small launcher forks the command instead.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def peak_rss(command: list[str], env: dict | None = None, stdout=None) -> tuple[int, float, int]:
    """(peak RSS in bytes, seconds, exit status) of one command; its output goes to ``stdout`` (a file
    object, default stderr). The peak is the kernel's ``ru_maxrss`` of the command's process and of the
    processes it waited for (worker pools): the largest of them, not their sum."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", LAUNCHER, str(report), *command], stdout=stdout or sys.stderr,
                       stderr=sys.stderr, env=env, check=True)
        seconds = time.perf_counter() - started
        kib, status = (int(v) for v in report.read_text().split())
    return kib * 1024, seconds, status  # Linux reports ru_maxrss in KiB


def machine() -> dict:
    """CPU model, cores, memory, load, GPUs and the versions that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {}
    for name in ("tensorflow", "keras", "numpy", "pydicom", "opencv-python-headless", "mlflow", "optuna"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    gpus = []
    if "tensorflow" in sys.modules:  # only describe GPUs where TensorFlow is loaded anyway
        gpus = [d.name for d in sys.modules["tensorflow"].config.list_physical_devices("GPU")]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb, "gpus": gpus,
            "load_avg_1m": round(os.getloadavg()[0], 2), "os": platform.platform(),
            "python": platform.python_version(), **versions}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stdout_to_stderr():
    """Keras progress lines and other prints go to stderr, keeping stdout for the two result lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def emit(name: str, result: dict, summary: str) -> None:
    """The JSON line (with the machine) and the summary line."""
    record = {"benchmark": name, **result, "machine": machine()}
    print(json.dumps(record, sort_keys=False), flush=True)
    print(summary, flush=True)


def verdict(ok: bool) -> str:
    return "pass" if ok else "miss"


def percentile(values, p: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), p))
