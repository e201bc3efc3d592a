"""The `spinemri` command: thin groups of commands over the library (see `spinemri COMMAND --help`).

    data       synth, flat, check, prepare                  (spinemri.cli.data)
    train, tune, ensemble                                   (spinemri.cli.train -> spinemri.api.train)
    compare, evaluate                                       (spinemri.cli.evaluate -> spinemri.api.compare)
    predict, export, score                                  (spinemri.cli.serve)
    registry   list, promote; card; runs reap               (spinemri.cli.registry)
    study      predict, evaluate, package, ablation         (spinemri.cli.study -> spinemri.api.study)
    pacs                                                    (spinemri.cli.pacs)

The study commands also answer to their older names, ``predict-study``, ``evaluate-study``,
``package-study`` and ``ablation``.
"""

from __future__ import annotations

import os

import click

from spinemri.cli.data import data
from spinemri.cli.evaluate import compare, evaluate_command
from spinemri.cli.pacs import pacs
from spinemri.cli.registry import card, registry, runs
from spinemri.cli.serve import export_command, predict, score
from spinemri.cli.study import ablation, evaluate_study, package_study, predict_study, study
from spinemri.cli.train import ensemble, train, tune
from spinemri.quiet import quiet_libraries



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spinemri")
def main() -> None:
    """spinemri: lumbar-spine MRI datasets, models and experiments tracked with MLflow.

    Start with `spinemri data synth --out data/phantom` to get a synthetic dataset in the
    RSNA 2024 layout, `spinemri data check` to validate a dataset, and `spinemri data prepare`
    to build the preprocessed cache that training reads.
    """
    # On a tracking server (never on a sqlite store) MLflow writes "View run … at: http://…" to stdout
    # whenever a run ends, the reaper's included: stdout stays the command's own, and --json stays JSON.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    quiet_libraries()


for command in (data, train, tune, ensemble, compare, evaluate_command, predict, export_command, score, registry, card,
                runs, study, pacs):
    main.add_command(command)
for old_name, command in (("predict-study", predict_study), ("evaluate-study", evaluate_study),
                          ("package-study", package_study), ("ablation", ablation)):
    main.add_command(command, old_name)
