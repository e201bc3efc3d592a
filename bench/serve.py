"""`/invocations` latency of `mlflow models serve` for one DICOM vs the same model called in-process,
and errors under 8 concurrent clients.

A model (default mobilenet_v2, 128 px, 1 epoch on a 10-study phantom) is trained and logged into a
private sqlite store by ``spinemri.api.classifier.train``; then, with one labelled DICOM slice as the
request row (``file_row``: base64 DICOM + site x/y):

* in-process: ``load_classifier(uri).predict(None, frame)`` — the served pyfunc's own code (DICOM
  decode, preprocess, model), without HTTP and JSON;
* served: POST /invocations {"dataframe_split": ...} to ``mlflow models serve --env-manager local -w 1``.

Both after 3 warm-up calls, --requests calls each, sequential; p50/p95 in ms. Then --clients
threads send --per-client requests each at once; any non-200 answer or exception is an error.
Targets (issue 8): p50 served / p50 in-process <= 1.5; 0 errors under 8 concurrent clients.

    python bench/serve.py [--quick] [--arch mobilenet_v2] [--img-size 128] [--requests 100] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import _common

TARGET_RATIO = 1.5
TARGET_ERRORS = 0
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an env proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_uri: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(_common.ROOT / "src"), env.get("PYTHONPATH", "")])
    env["PATH"] = f"{mlflow_cli.parent}{os.pathsep}{env.get('PATH', '')}"  # it starts `uvicorn` from PATH
    with open(log_path, "wb") as out:
        process = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                    "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mlflow models serve exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with DIRECT.open(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    raise SystemExit(f"mlflow models serve did not answer /ping within 300 s; see {log_path}")


def post(url: str, body: bytes) -> float:
    """Seconds for one /invocations call; raises on anything but HTTP 200 with predictions."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with DIRECT.open(request, timeout=120) as response:
        payload = json.loads(response.read())
        if response.status != 200 or "predictions" not in payload:
            raise RuntimeError(f"HTTP {response.status}: {str(payload)[:200]}")
    return time.perf_counter() - started


def timed(function, count: int) -> list[float]:
    for _ in range(3):
        function()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def summary_ms(times: list[float]) -> dict:
    return {"p50": round(1e3 * _common.percentile(times, 50), 2), "p95": round(1e3 * _common.percentile(times, 95), 2),
            "n": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny backbone at 48 px, 10 requests, 8 x 2 concurrent")
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=25)
    args = parser.parse_args()
    if args.quick:
        args.arch, args.img_size, args.requests, args.per_client = "tiny", 48, 10, 2

    import pandas as pd

    data_dir = _common.phantom(10)
    with _common.private_store() as tmp:
        with _common.stdout_to_stderr():
            from spinemri.api.classifier import train
            from spinemri.config import load_experiment
            from spinemri.serving.classifier import load_classifier
            from spinemri.serving.inputs import file_row

            config = load_experiment("quick", {"arch": args.arch, "img_size": args.img_size, "epochs": 1,
                                               "batch_size": 32, "data_dir": str(data_dir)})
            result = train(config)
            label = pd.read_csv(data_dir / "train_label_coordinates.csv").iloc[0]
            dicom = data_dir / "train_images" / str(label.study_id) / str(label.series_id) / f"{label.instance_number}.dcm"
            row = file_row(dicom, label.x, label.y)
            frame = pd.DataFrame([row])
            classifier = load_classifier(result.model_uri)
            in_process = timed(lambda: classifier.predict(None, frame), args.requests)
            tensor = classifier.prepare_row(row, 0)[None]
            model_only = timed(lambda: classifier.predict_images(tensor), args.requests)

        body = json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)}).encode()
        process, url = start_server(result.model_uri, tmp / "serve.log")
        try:
            served = timed(lambda: post(url, body), args.requests)
            errors, loaded, lock = [], [], threading.Lock()

            def client():
                for _ in range(args.per_client):
                    try:
                        seconds = post(url, body)
                        with lock:
                            loaded.append(seconds)
                    except Exception as exc:  # noqa: BLE001 - every failure is an error to count
                        with lock:
                            errors.append(f"{type(exc).__name__}: {exc}"[:200])

            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)

    ratio = _common.percentile(served, 50) / _common.percentile(in_process, 50)
    ok = ratio <= TARGET_RATIO and len(errors) <= TARGET_ERRORS
    _common.emit("serve", {
        "arch": args.arch, "img_size": args.img_size, "dicom_bytes": dicom.stat().st_size,
        "latency_ms": {"in_process": summary_ms(in_process), "served": summary_ms(served),
                       "model_only": summary_ms(model_only)},
        "concurrent": {"clients": args.clients, "requests": args.clients * args.per_client, "errors": len(errors),
                       "error_samples": errors[:3], "latency_ms": summary_ms(loaded) if loaded else None,
                       "requests_per_s": round(len(loaded) / wall, 2)},
        "ratios": {
            "served_vs_in_process_p50": {"value": round(ratio, 3), "target": f"<= {TARGET_RATIO}",
                                         "result": _common.verdict(ratio <= TARGET_RATIO)},
            "errors_under_concurrency": {"value": len(errors), "target": f"== {TARGET_ERRORS}",
                                         "result": _common.verdict(len(errors) <= TARGET_ERRORS)},
        },
        "result": _common.verdict(ok)},
        f"serve: /invocations p50 {summary_ms(served)['p50']:.1f} ms (p95 {summary_ms(served)['p95']:.1f}) vs in-process "
        f"p50 {summary_ms(in_process)['p50']:.1f} ms (p95 {summary_ms(in_process)['p95']:.1f}) = {ratio:.2f}x "
        f"(target <= {TARGET_RATIO}: {_common.verdict(ratio <= TARGET_RATIO)}); {len(errors)} errors in "
        f"{args.clients * args.per_client} requests from {args.clients} concurrent clients (target 0: "
        f"{_common.verdict(len(errors) <= TARGET_ERRORS)})")


if __name__ == "__main__":
    main()
