"""Worker pools: started fresh, so a worker shares no threads or heap with the process that asks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from spinemri.phantom import synthesize
from spinemri.phantom.settings import PhantomConfig


def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path):
    script = tmp_path / "make_phantom.py"
    script.write_text(textwrap.dedent(f"""
        from spinemri.phantom import synthesize
        from spinemri.phantom.settings import PhantomConfig
        synthesize({str(tmp_path / 'out')!r}, PhantomConfig(studies=2), workers=2)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "spinemri.errors.WorkerDied" in result.stderr
    assert 'if __name__ == "__main__":' in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))  # nothing half-written


def test_the_same_script_with_its_guard_runs(tmp_path):
    script = tmp_path / "make_phantom.py"
    script.write_text(textwrap.dedent(f"""
        from spinemri.phantom import synthesize
        from spinemri.phantom.settings import PhantomConfig
        if __name__ == "__main__":
            print(synthesize({str(tmp_path / 'out')!r}, PhantomConfig(studies=2), workers=2).studies)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"
    expected = synthesize(tmp_path / "in_process", PhantomConfig(studies=2), workers=1)
    assert expected.images == sum(1 for _ in (tmp_path / "out").rglob("*.dcm"))
