"""`spinemri registry` and `spinemri runs`: the registered models' versions and aliases, and runs of dead processes.
"""

from __future__ import annotations

import json

import click

from spinemri.cli.common import tracked, user_errors


@click.group()
def registry() -> None:
    """The MLflow Model Registry: versions, the `champion` alias, promotion by hand.

    Training registers every model as a new version of the experiment's registered model
    (default `spinemri`); `champion` moves to it only if it beats the champion's held-out metric
    on the same held-out set, otherwise it becomes `challenger`.
    """


@registry.command("list")
@click.option("--name", default="spinemri", show_default=True, help="Registered model.")
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
@user_errors
@tracked
def registry_list(name, as_json) -> None:
    """Versions of a registered model, newest first: aliases, metric, the paired difference to the champion
    it was judged against, held-out set, architecture, run."""
    from spinemri.tracking.registry import list_versions

    rows = list_versions(name)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"{name} has no versions yet")
        return
    def interval(paired: dict) -> str:
        return (f"{paired['difference']:+.4f} [{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}], "
                f"{paired['studies']}") if len(paired) == 4 else "-"

    click.echo(f"{'version':>7}  {'aliases':<20} {'metric':<32} {'value':>8}  {'vs floor [95% CI], studies':<34} "
               f"{'vs champion [95% CI], studies':<34} {'eval set':<16} {'arch':<14} {'run':<32}  created")
    for row in rows:
        value = "" if row["metric_value"] is None else f"{row['metric_value']:.4f}"
        click.echo(f"{row['version']:>7}  {','.join(row['aliases']) or '-':<20} {row['metric_name'] or '-':<32} "
                   f"{value:>8}  {interval(row['floor']):<34} {interval(row['paired']):<34} "
                   f"{row['eval_set'] or '-':<16} {row['arch'] or '-':<14} {row['run_id']:<32}  {row['created']}")
    click.echo("")
    for row in rows:
        click.echo(f"v{row['version']}: {row['verdict_sentence'] or 'not judged against the per-site prior'}")
        if row["decision"]:
            click.echo(f"  decision: {row['decision']}")


@registry.command("promote")
@click.argument("version")
@click.option("--reason", required=True, help="Why this version should serve (kept as a tag on the version).")
@click.option("--name", default="spinemri", show_default=True, help="Registered model.")
@user_errors
@tracked
def registry_promote(version, reason, name) -> None:
    """Point `champion` at VERSION whatever the metrics say (an explicit, recorded override).

    A running `mlflow models serve -m models:/NAME@champion` keeps the model it loaded at
    start-up: restart it to serve the new champion.
    """
    from spinemri.tracking.registry import promote

    click.echo(str(promote(name, version, reason)))


@click.command()
@click.argument("model_uri")
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder for <name>-v<version>.model.json (RSNA ATLAS 2025-11) and <name>-v<version>.md.")
@user_errors
@tracked
def card(model_uri, out_dir) -> None:
    """Write the model card of a registered version (MODEL_URI: models:/NAME/VERSION or models:/NAME@ALIAS) from
    its MLflow record: an RSNA ATLAS JSON card and a one-page Markdown card with a CLAIM-style checklist."""
    from spinemri.tracking.card import build_card, write_card

    made = build_card(model_uri)
    for path in write_card(made, out_dir):
        click.echo(str(path))


@click.group()
def runs() -> None:
    """MLflow runs of spinemri commands."""


@runs.command("reap")
@click.option("--json", "as_json", is_flag=True, help="Print the run ids as JSON.")
@user_errors
def runs_reap(as_json) -> None:
    """Mark FAILED the runs left RUNNING by spinemri processes of this machine that have died.

    A process killed with SIGKILL (or by the out-of-memory killer) cannot end its run. Every
    spinemri command that opens the store does this first; this command does only this.
    """
    from spinemri.tracking.runs import reap_dead_runs
    from spinemri.tracking.store import open_tracking_store

    open_tracking_store(reap=False)
    reaped = reap_dead_runs()
    if as_json:
        click.echo(json.dumps({"reaped": reaped}))
        return
    click.echo(f"marked {len(reaped)} run(s) FAILED" + (": " + ", ".join(reaped) if reaped else ""))
