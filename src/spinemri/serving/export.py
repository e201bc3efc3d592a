"""Mobile export of the trained classifier (TFLite or ONNX), kept only when it matches Keras.

``export_model(model, fmt, out, samples)`` converts the Keras model, loads the written file with
the format's own runtime, runs it on ``samples`` and compares every head's probabilities with the
Keras model's. The file is converted into a hidden temporary file beside ``out`` and renamed into
place only after the parity check passes, so a failed conversion or check never leaves a file
that looks finished (with ``overwrite=True`` the previous file stays until the new one passes).

Recipes that work with TF 2.21 / Keras 3.15 for the three-head model (dict outputs,
BatchNormalization, Dropout, Normalization scaling layers):

- tflite: ``model.export(dir, format="tf_saved_model")`` then
  ``tf.lite.TFLiteConverter.from_saved_model(dir)``; float32, builtin ops only, dynamic batch.
  (``from_keras_model`` does the same export inside but prints every captured variable to
  stdout; a converted ``tf.function`` wrapping the model drops its variables and outputs NaN.)
- onnx: ``tf2onnx.convert.from_keras`` (opset 17), which freezes the model through its
  trackable. Keras's own ``model.export(format="onnx")`` leaves the constants of Normalization
  layers (densenet's ImageNet mean/std) as extra graph inputs, so that file needs more than an
  image to run.

Outputs are matched by name, never by position: the TFLite file keeps the Keras dict keys as its
signature's output names but orders its output tensors condition, severity, level; ONNX names its
outputs after the dict keys. The TFLite file runs under ``ai_edge_litert`` when installed, else
under ``tf.lite.Interpreter``.

``phantom_samples(meta)`` makes model-ready inputs for the check from the built-in synthetic
phantom with the model's own preprocessing, and ``export_classifier(model_uri, ...)`` ties both
to a logged model.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from spinemri.data.cache import prepare
from spinemri.phantom import PhantomConfig, synthesize
from spinemri.data.preprocess import PreprocessConfig
from spinemri.errors import ExportError
from spinemri.atomic import atomic_path, check_target
from spinemri.serving.classifier import load_classifier

if TYPE_CHECKING:
    import keras

FORMATS = ("tflite", "onnx")
SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}
ONNX_OPSET = 17  # run by onnxruntime 1.14+ (desktop and mobile builds)
DEFAULT_TOLERANCE = 1e-3
_BATCH = 16  # samples per runtime call: bounds memory for large inputs, exercises the dynamic batch
_EXTRA = "pip install 'spinemri[export]'"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    size_bytes: int
    max_abs_diff: float  # over all heads, classes and samples: |exported - keras| probabilities
    per_head_max_abs_diff: dict[str, float]
    samples: int
    seconds: float  # conversion plus parity check
    runtime: str = ""  # what ran the exported file, e.g. "onnxruntime 1.32.0"


def export_model(model: "keras.Model", fmt: str, out: str | Path, samples: np.ndarray, *,
                 tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False) -> ExportResult:
    """Convert ``model`` to ``fmt`` at ``out`` and check it on ``samples`` (float32 (N, S, S, C), 0..255)."""
    out = check_request(fmt, out, overwrite)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    samples = _check_samples(model, samples)
    convert, run = _backend(fmt)
    started = time.perf_counter()
    expected = _keras_outputs(model, samples)
    with atomic_path(out) as partial:
        try:
            convert(model, partial)
        except Exception as exc:  # noqa: BLE001 - converters raise many types; the cause is chained
            raise ExportError(f"{fmt} conversion failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        got, runtime = run(partial, samples)
        per_head = _compare(expected, got, fmt)
        worst = max(per_head.values())
        if not worst <= tolerance:  # also catches NaN
            details = ", ".join(f"{head} {diff:.3g}" for head, diff in per_head.items())
            raise ExportError(f"the {fmt} file does not match the Keras model: max abs difference {worst:.3g} "
                              f"> tolerance {tolerance:g} over {len(samples)} samples ({details}); "
                              "nothing was written")
    return ExportResult(path=out, format=fmt, size_bytes=out.stat().st_size, max_abs_diff=float(worst),
                        per_head_max_abs_diff=per_head, samples=len(samples),
                        seconds=round(time.perf_counter() - started, 2), runtime=runtime)


def export_classifier(model_uri: str, fmt: str, out: str | Path, *, count: int = 16, seed: int = 0,
                      tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False) -> ExportResult:
    """Export a logged classifier (``models:/spinemri@champion``, ``runs:/<id>/model``), checked on phantom images."""
    check_request(fmt, out, overwrite)  # fail before loading the model and making samples
    classifier = load_classifier(model_uri)
    if "members" in classifier.meta:
        raise ExportError(f"{model_uri} is an ensemble of {len(classifier.meta['members'])} models, which one mobile "
                          "file cannot hold; export one member's model (runs:/<fold run id>/model)")
    samples = phantom_samples(classifier.meta, count=count, seed=seed)
    return export_model(classifier.model, fmt, out, samples, tolerance=tolerance, overwrite=overwrite)


def check_request(fmt: str, out: str | Path, overwrite: bool = False) -> Path:
    """The output path, after checking the format, its folder and an existing file (and the format's packages)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = check_target(out, overwrite=overwrite, error=ExportError, label=str(out),
                       what=f"a file path such as {Path(out) / ('model' + SUFFIXES[fmt])}")
    _backend(fmt)
    return out


def phantom_samples(meta: dict, count: int = 16, seed: int = 0) -> np.ndarray:
    """``count`` model-ready float32 images (N, S, S, C), 0..255, from the synthetic phantom.

    The phantom is written as DICOM into a temporary folder and run through the model's own
    preprocessing (``meta["preprocess"]``), so the images look like what the model was trained on.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    config = PreprocessConfig.from_dict(meta["preprocess"])
    studies = math.ceil(count / 20)  # a phantom study gives up to 25 samples (5 conditions x 5 levels)
    with tempfile.TemporaryDirectory(prefix="spinemri-export-") as tmp:
        for _ in range(4):
            data_dir = Path(tmp) / f"phantom-{studies}"
            synthesize(data_dir, PhantomConfig(studies=studies, seed=seed), workers=1)
            dataset = prepare(data_dir, config, cache_dir=Path(tmp) / "cache", split_fractions=(1.0, 0.0, 0.0))
            images = dataset.images()
            if len(images) >= count:
                break
            studies *= 2
        else:
            raise RuntimeError(f"the phantom gave only {len(images)} samples, fewer than {count}")
        pick = np.sort(np.random.default_rng(seed).choice(len(images), size=count, replace=False))
        samples = np.asarray(images[pick], dtype=np.float32)
        del images  # release the memory map before the folder is removed
    expected = meta.get("input_shape")
    if expected is not None and list(samples.shape[1:]) != list(expected):
        raise ValueError(f"preprocessing {config.to_dict()} makes images of shape {samples.shape[1:]}, "
                         f"but the model expects {tuple(expected)}")
    return samples


# --- checks and comparison ---------------------------------------------------------------------

def _check_samples(model: "keras.Model", samples: np.ndarray) -> np.ndarray:
    if len(model.inputs) != 1:
        raise ExportError(f"export supports models with one image input; this one has {len(model.inputs)}")
    samples = np.asarray(samples, dtype=np.float32)
    want = tuple(model.inputs[0].shape[1:])
    if samples.ndim != len(want) + 1 or len(samples) == 0 or any(
            w is not None and w != s for w, s in zip(want, samples.shape[1:])):
        shape = ", ".join("S" if w is None else str(w) for w in want)
        raise ExportError(f"samples must be a non-empty array of shape (N, {shape}); got {samples.shape}")
    return samples


def _keras_outputs(model: "keras.Model", samples: np.ndarray) -> dict[str, np.ndarray]:
    outputs = model.predict(samples, batch_size=_BATCH, verbose=0)
    if not isinstance(outputs, dict):
        outputs = dict(zip(model.output_names, outputs if isinstance(outputs, (list, tuple)) else [outputs]))
    return {name: np.asarray(value) for name, value in outputs.items()}


def match_outputs(expected: list[str], exported: list[str]) -> dict[str, str]:
    """Map each Keras output name to the exported output of the same name.

    Exact names first; then names compared without a tensor suffix (``:0``), a scope prefix
    (``model/condition``) and case. Every head must find exactly one output.
    """
    def bare(name: str) -> str:
        return name.rsplit(":", 1)[0].rsplit("/", 1)[-1].lower()

    mapping = {name: name for name in expected if name in exported}
    for name in expected:
        if name in mapping:
            continue
        candidates = [e for e in exported if bare(e) == bare(name) and e not in mapping.values()]
        if len(candidates) == 1:
            mapping[name] = candidates[0]
    if len(mapping) != len(expected) or len(set(mapping.values())) != len(mapping):
        raise ExportError(f"cannot match the exported outputs {sorted(exported)} to the model's heads "
                          f"{sorted(expected)} by name")
    return mapping


def _compare(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], fmt: str) -> dict[str, float]:
    mapping = match_outputs(list(expected), list(got))
    per_head = {}
    for head, name in mapping.items():
        if got[name].shape != expected[head].shape:
            raise ExportError(f"the {fmt} output {name!r} has shape {got[name].shape}, "
                              f"the Keras head {head!r} {expected[head].shape}")
        per_head[head] = float(np.max(np.abs(got[name].astype(np.float64) - expected[head])))
    return per_head


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


# --- formats -----------------------------------------------------------------------------------

Converter = Callable[["keras.Model", Path], None]
Runner = Callable[[Path, np.ndarray], tuple[dict[str, np.ndarray], str]]


def _backend(fmt: str) -> tuple[Converter, Runner]:
    """The converter and runner of a format, after checking that its packages import."""
    if fmt == "tflite":
        import tensorflow  # noqa: F401 - a project dependency; the converter lives there
        return _convert_tflite, _run_tflite
    missing = []
    for module in ("tf2onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"ONNX export needs tf2onnx and onnxruntime (missing: {', '.join(missing)}): {_EXTRA}")
    return _convert_onnx, _run_onnx


def _convert_tflite(model: "keras.Model", path: Path) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="spinemri-savedmodel-") as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        path.write_bytes(converter.convert())


def _tflite_interpreter(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():  # deprecated in favour of ai_edge_litert, still shipped in TF 2.21
            warnings.filterwarnings("ignore", message=r"\s*Warning: tf\.lite\.Interpreter is deprecated")
            return tf.lite.Interpreter(model_path=str(path)), f"tf.lite {tf.__version__}"
    return Interpreter(model_path=str(path)), f"ai_edge_litert {metadata.version('ai-edge-litert')}"


def _run_tflite(path: Path, samples: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
    try:
        interpreter, runtime = _tflite_interpreter(path)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the written tflite file does not load: {_first_line(exc)}") from exc
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        raise ExportError(f"expected one signature in the tflite file, found {sorted(signatures) or 'none'}")
    key, signature = next(iter(signatures.items()))
    if len(signature["inputs"]) != 1:
        raise ExportError(f"expected one input in the tflite signature, found {signature['inputs']}")
    runner = interpreter.get_signature_runner(key)
    name = signature["inputs"][0]
    return _batched(lambda batch: runner(**{name: batch}), samples), runtime


def _convert_onnx(model: "keras.Model", path: Path) -> None:
    import tensorflow as tf
    import tf2onnx

    specs = [tf.TensorSpec((None, *t.shape[1:]), tf.as_dtype(t.dtype), name=t.name) for t in model.inputs]
    tf2onnx.convert.from_keras(model, input_signature=specs, opset=ONNX_OPSET, output_path=str(path))


def _run_onnx(path: Path, samples: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the written onnx file does not load in onnxruntime: {_first_line(exc)}") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ExportError(f"expected one input in the onnx file, found {[i.name for i in inputs]}")
    names = [o.name for o in session.get_outputs()]
    return _batched(lambda batch: dict(zip(names, session.run(names, {inputs[0].name: batch}))), samples), \
        f"onnxruntime {ort.__version__}"


def _batched(run: Callable[[np.ndarray], dict], samples: np.ndarray) -> dict[str, np.ndarray]:
    parts = [run(np.ascontiguousarray(samples[i: i + _BATCH])) for i in range(0, len(samples), _BATCH)]
    return {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in parts[0]}
