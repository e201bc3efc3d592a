"""MkDocs hook that replaces {{ settings_table }} with a table of every setting, read from spinemri.config."""

import dataclasses

import yaml

from spinemri.config import ExperimentConfig

PLACEHOLDER = "{{ settings_table }}"


def _rows(cls, prefix=""):
    """(dotted key, default, help) for every leaf field, nested dataclasses included."""
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            yield from _rows(type(default), key + ".")
        else:
            yield key, default, field.metadata.get("help", "")


def _yaml(value):
    """A default as it would be written in an experiment YAML."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).replace("\n...", "").strip()


def settings_table():
    lines = ["| key | default | what it does |", "| --- | --- | --- |"]
    for key, default, text in _rows(ExperimentConfig):
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
        lines.append(f"| `{key}` | `{_yaml(default)}` | {text} |")
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    return markdown.replace(PLACEHOLDER, settings_table()) if PLACEHOLDER in markdown else markdown
