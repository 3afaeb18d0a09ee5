"""Layering: the library does not import the release tooling; the models read the release manifest themselves."""
import subprocess
import sys


def test_import_greenmim_does_not_import_the_release_tooling():
    code = "import greenmim, sys; assert 'greenmim.hub' not in sys.modules, sorted(m for m in sys.modules if 'hub' in m)"
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
