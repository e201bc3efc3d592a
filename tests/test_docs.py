"""The documentation builds: every page, link and anchor resolves (MkDocs in strict mode), and the README
stays a front page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    settings = (tmp_path / "site" / "experiments" / "index.html").read_text()
    assert "train.augment.rotation_deg" in settings and "{{ settings_table }}" not in settings


def test_the_readme_is_a_front_page_with_working_links():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 10_000
    assert "## Quick start" in readme and "make demo" in readme and "make test" in readme
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
