"""timm's own model tests (``tests/test_models.py`` of the installed timm's source distribution) on every green model.

The suite is not installed with timm: it is taken from timm's sdist on PyPI (``pip download``, the package registry
the install itself uses), cached under ``~/.cache/greenmim/``, or read from ``$TIMM_TESTS_DIR`` (a folder holding
timm's ``tests/``). It runs in a subprocess that imports greenmim first, so timm lists the green models, and is
filtered to them with ``-k``. ``GREENMIM_SKIP_TIMM_SUITE=1`` skips it (for machines without a package registry).
"""
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

import greenmim  # noqa: F401  (registers the green models)

# timm tests parametrised over every green model that must run and pass for each (by test id)
REQUIRED = ('test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_torchscript',
            'test_model_forward_features', 'test_model_forward_fx', 'test_model_backward_fx')
# timm parametrises these over a list of timm's own model modules only; the driver calls them on every green model
BY_MODULE = ('test_model_forward_intermediates', 'test_model_forward_intermediates_features')
# a green model of one of timm's non-standard families (twins_*: token outputs, no pool_size) takes timm's cfg test
# for those, as its original does: test_model_default_cfgs is deselected for it and the driver calls this one
NON_STD_CFG_TEST = 'test_model_default_cfgs_non_std'
# timm's own skip of a fixed-size model larger than a test's input limit (e.g. 256 px SwinV2 in the fx backward
# test, 384 px ones in most): it skips the timm originals alike, and is the one skip a required test may take
SIZE_LIMIT = 'Fixed input size model > limit.'
DRIVER = """
import fnmatch, sys, greenmim, pytest, timm
from tests import test_models as suite
non_std = [name for name in timm.list_models('green_*', include_tags=True)
           if any(fnmatch.fnmatch(name[len('green_'):], f) for f in suite.NON_STD_FILTERS)]
code = pytest.main(sys.argv[3:] + [f'--deselect=tests/test_models.py::test_model_default_cfgs[1-{n}]' for n in non_std])
if code == 0:
    for name in non_std:
        getattr(suite, sys.argv[2])(name, 1, 'meta' if suite._HAS_DEVICE_CONTEXT else suite.torch_device)
        print('called', sys.argv[2], name)
    for name in timm.list_models('green_*'):
        for test in sys.argv[1].split(','):
            try:
                getattr(suite, test)(name, 1)
                print('called', test, name)
            except pytest.skip.Exception as skip:
                print('skipped', test, name, skip.msg)
sys.exit(code)
"""

def _suite_dir() -> Path:
    """A folder whose ``tests/test_models.py`` is the installed timm version's."""
    if os.environ.get('TIMM_TESTS_DIR'):
        return Path(os.environ['TIMM_TESTS_DIR'])
    root = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'greenmim' / f'timm-{timm.__version__}'
    if (root / 'tests' / 'test_models.py').exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:', '-d', tmp,
             f'timm=={timm.__version__}'], capture_output=True, text=True)
        archives = list(Path(tmp).glob('timm-*.tar.gz'))
        if done.returncode or not archives:
            pytest.fail(f'could not download the timm {timm.__version__} sdist for its test suite '
                        f'(set TIMM_TESTS_DIR, or GREENMIM_SKIP_TIMM_SUITE=1 to skip): {done.stderr[-500:]}')
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if re.match(r'timm-[^/]+/tests/[^/]+\.py$', m.name)]
            partial = root.with_suffix('.tmp')
            tar.extractall(partial, members=members, filter='data')
        partial.joinpath(members[0].name.split('/')[0]).rename(root)  # whole folder in one step
        partial.rmdir()
    return root


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('GREENMIM_SKIP_TIMM_SUITE') == '1', reason='GREENMIM_SKIP_TIMM_SUITE=1')
def test_timm_model_suite_passes_on_every_green_model(tmp_path):
    suite = _suite_dir()
    models = timm.list_models('green_*')
    report = tmp_path / 'junit.xml'
    done = subprocess.run(
        [sys.executable, '-c', DRIVER, ','.join(BY_MODULE), NON_STD_CFG_TEST, 'tests/test_models.py', '-q',
         '-p', 'no:cacheprovider', '-k', ' or '.join(models), f'--junitxml={report}',
         '-W', 'ignore::DeprecationWarning', '-W', 'ignore::FutureWarning'],
        cwd=suite, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    cases = list(ET.parse(report).iter('testcase'))
    ran = {case.get('name') for case in cases if all(  # passed (no child element), or skipped by timm's size limit
        c.tag == 'skipped' and (c.get('message') or '').endswith(SIZE_LIMIT) for c in case)}
    for model in models:
        missing = [t for t in REQUIRED if not any(re.fullmatch(rf'{t}\[(\w+-)*{model}(\.\w+)?\]', p) for p in ran)]
        if missing == ['test_model_default_cfgs'] and f'called {NON_STD_CFG_TEST} {model}.' in done.stdout:
            missing = []
        assert not missing, f'{model}: timm tests that did not run and pass (nor hit timm\'s size limit): {missing}'
        for test in BY_MODULE:
            assert f'called {test} {model}\n' in done.stdout or f'skipped {test} {model} {SIZE_LIMIT}' in done.stdout
