"""What every served spinemri model shares as an MLflow pyfunc: the package logged as its code, a Keras
file with its meta.json, loading a logged model by URI with a clear error, and the scoring server's
request bounds.
"""

from __future__ import annotations

import json
from pathlib import Path
import re
import tempfile

import mlflow
from mlflow.exceptions import MlflowException

from spinemri.data import limits
from spinemri.data.environment import check_environment
from spinemri.errors import UserError
from spinemri.quiet import start_tensorflow
from spinemri.serving.inputs import InputError
from spinemri.tracking.artifacts import load_pyfunc
from spinemri.tracking.store import check_server

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/spinemri, logged with every model as its code


def guard_scoring_server() -> None:
    """Inside `mlflow models serve`, bound what a request may cost before MLflow parses it.

    MLflow's scoring server reads any body and hands it to ``json.loads``: a body over
    ``SPINEMRI_MAX_REQUEST_MB`` is answered 413 before it is parsed, and JSON nested too deep for
    Python's parser (which MLflow answers with a 500) gets a 400 that says so; a boolean where a row's
    coordinate goes (which MLflow's schema would turn into 1.0 or 0.0) gets a 400 naming the row. Outside the
    server (``mlflow.pyfunc.load_model`` in a script) this does nothing.
    """
    import sys

    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    if server is None or getattr(server.invocations, "spinemri_guard", False):
        return
    original = server.invocations

    def invocations(data, content_type, model, input_schema):
        size = len(data) if isinstance(data, (bytes, str)) else 0
        if size > limits.REQUEST_BYTES.value:
            message = (f"the request body is {limits.human_size(size)}, over {limits.REQUEST_BYTES.describe()}; "
                       "send fewer images or studies per request")
            return server.InvocationsResponse(json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": message}),
                                              413, "application/json")
        try:
            if isinstance(data, (bytes, str)) and _BOOLEAN.search(data if isinstance(data, bytes) else data.encode()):
                _refuse_boolean_coordinates(json.loads(data))  # only a body with a JSON true/false is read twice
            return original(data, content_type, model, input_schema)
        except RecursionError:
            raise InputError("the request's JSON is nested too deeply to parse; send a flat dataframe_split or "
                             "dataframe_records payload (one row per image or study)") from None

    invocations.spinemri_guard = True
    server.invocations = invocations


# A JSON true/false where a value starts (base64 and the site names never hold ":", "," or "[").
_BOOLEAN = re.compile(rb"[:,\[]\s*(?:true|false)\b")
COORDINATES = ("x", "y")


def _refuse_boolean_coordinates(body) -> None:
    """InputError naming the first row whose x or y is a boolean, in any of the payloads MLflow takes."""
    if not isinstance(body, dict):
        return
    for key in ("dataframe_records", "inputs", "instances", "dataframe_split"):
        payload = body.get(key)
        if key == "dataframe_split" and isinstance(payload, dict):
            columns = payload.get("columns") or []
            rows = [dict(zip(columns, row)) for row in payload.get("data") or [] if isinstance(row, list)]
        elif isinstance(payload, dict):  # columns of values
            rows = [dict(zip(payload, values)) for values in zip(*[v if isinstance(v, list) else [v]
                                                                  for v in payload.values()])]
        else:
            rows = payload if isinstance(payload, list) else []
        for index, row in enumerate(rows):
            for column in COORDINATES:
                if isinstance(row, dict) and isinstance(row.get(column), bool):
                    raise InputError(f"row {index}: {column} must be a number of pixels, got {row[column]!r}")


def check_settings_at_load() -> None:
    """A served model refuses to start on a bad environment setting (a limit, the series rules), instead of
    answering every request with it."""
    check_environment()


class KerasWithMeta(mlflow.pyfunc.PythonModel):
    """A pyfunc whose artifacts are a Keras file and meta.json (preprocessing, classes, ...)."""

    def load_context(self, context) -> None:
        start_tensorflow()  # quietly: no CUDA start-up lines in a server without a GPU
        import keras

        check_settings_at_load()
        guard_scoring_server()

        self.model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())


def log_keras_pyfunc(python_model: KerasWithMeta, model, meta: dict, **log_model_kwargs):
    """Save ``model`` and ``meta`` as the artifacts of ``python_model`` and log it as ``model``."""
    with tempfile.TemporaryDirectory() as tmp:
        keras_path = Path(tmp) / "model.keras"
        model.save(keras_path)
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=2))
        return mlflow.pyfunc.log_model(name="model", python_model=python_model,
                                       artifacts={"keras_model": str(keras_path), "meta": str(meta_path)},
                                       code_paths=[str(PACKAGE_DIR)], **log_model_kwargs)


def load_python_model(model_uri: str, cls: type, what: str, hint: str):
    """The ``cls`` instance behind a logged model URI, or a UserError naming the URI and the fix."""
    tracking_uri = mlflow.get_tracking_uri()
    if tracking_uri.startswith(("http://", "https://")) and not Path(model_uri).exists():
        check_server(tracking_uri)  # within seconds, not after MLflow's minutes of retries
    try:
        model = load_pyfunc(model_uri)
    except (ModuleNotFoundError, AttributeError) as exc:  # its classes are where an earlier version kept them
        raise UserError(f"{what} {model_uri!r} was logged by an earlier spinemri version, whose classes this one "
                        f"keeps elsewhere ({exc}); serve it with `mlflow models serve` (it brings its own copy of "
                        f"spinemri), or log it again with this version; {hint}") from None
    except MlflowException as exc:
        raise UserError(f"cannot load {what} {model_uri!r} from {mlflow.get_tracking_uri()}: {exc.message}; "
                        f"{hint}") from None
    except OSError as exc:
        raise UserError(f"cannot load {what} {model_uri!r}: {exc}") from None
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, cls):
        raise UserError(f"{model_uri!r} is a {type(python_model).__name__}, not a spinemri {what}")
    return python_model
