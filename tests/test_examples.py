"""The example notebooks (``examples/*.ipynb``) run top to bottom offline at tiny settings, and say something true.

Each notebook is executed with nbclient; the test's parameters go into a cell after the one tagged ``parameters``
(as papermill does), and a last cell prints the notebook's ``summary`` as JSON. The weights are a tiny
``green_swin_tiny`` pre-trained here with ``greenmim pretrain`` (and the same weights saved in the authors' key
layout, with the early patch-merging order, for ``convert_official.ipynb``); the data are the photos shipped
with the package. Set ``GREENMIM_EXAMPLES_OUT`` to a folder to keep the executed notebooks' figures as PNGs.
"""
import base64
import json
import math
import os
import re
from pathlib import Path

import nbclient
import nbformat
import pytest
import torch
from test_hub_convert import authors_greenmim, early_merge_weights
from train_fixtures import make_two_class_folder

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
NOTEBOOKS = ('convert_official', 'finetune', 'reconstruct', 'speed')
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
SUMMARY = '__summary__ '


def test_every_notebook_is_tested_and_committed_without_outputs():
    assert sorted(p.stem for p in EXAMPLES.glob('*.ipynb')) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        book = nbformat.read(EXAMPLES / f'{name}.ipynb', as_version=4)
        nbformat.validate(book)
        code = [c for c in book.cells if c.cell_type == 'code']
        assert 'parameters' in code[0].metadata.get('tags', []), f'{name}: the first code cell holds the parameters'
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, f'{name}: outputs committed'


def test_weights_overlay_names_each_kind_of_source(tmp_path):
    from greenmim.hub.sources import weights_overlay
    assert weights_overlay('org/name') == dict(hf_hub_id='org/name')
    assert weights_overlay(f'local-dir:{tmp_path}') == dict(source='local-dir', file=str(tmp_path))
    with pytest.raises(FileNotFoundError, match='no such file'):
        weights_overlay(str(tmp_path / 'missing' / 'model.safetensors'))
    (tmp_path / 'authors.pth').write_bytes(b'')
    with pytest.raises(ValueError, match='greenmim convert'):
        weights_overlay(str(tmp_path / 'authors.pth'))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A tiny GreenMIM pre-trained for one epoch on the shipped photos (``greenmim pretrain``)."""
    from greenmim.train import PretrainConfig, pretrain
    out = tmp_path_factory.mktemp('pretrain')
    pretrain(PretrainConfig(model='green_swin_tiny', model_kwargs=TINY, decoder_dim=32, batch_size=8, epochs=1,
                            warmup_epochs=0, lr=1e-3, num_workers=0, vis_every=0, output_dir=str(out / 'run')))
    return out / 'run'


def _with_parameters(name, params):
    """``examples/<name>.ipynb`` with ``params`` in a cell after the one tagged ``parameters`` (as papermill does),
    and the index of the notebook's first code cell after them."""
    book = nbformat.read(EXAMPLES / f'{name}.ipynb', as_version=4)
    at = next(i for i, c in enumerate(book.cells) if 'parameters' in c.metadata.get('tags', []))
    injected = '\n'.join(f'{key} = {value!r}' for key, value in params.items())
    book.cells.insert(at + 1, nbformat.v4.new_code_cell(injected, metadata={'tags': ['injected-parameters']}))
    return book, next(i for i, c in enumerate(book.cells) if i > at + 1 and c.cell_type == 'code')


def _run(book, cwd):
    nbclient.NotebookClient(book, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': str(cwd)}}).execute()


def execute(name, params, cwd):
    """Run ``examples/<name>.ipynb`` with ``params`` in ``cwd``; return ``(summary, PNG figures)``."""
    book, _ = _with_parameters(name, params)
    book.cells.append(nbformat.v4.new_code_cell(f'import json; print({SUMMARY!r} + json.dumps(summary))'))
    _run(book, cwd)
    printed = ''.join(o.get('text', '') for o in book.cells[-1].outputs if o.output_type == 'stream')
    summary = json.loads(printed.split(SUMMARY, 1)[1])
    figures = [base64.b64decode(o.data['image/png']) for c in book.cells if c.cell_type == 'code'
               for o in c.outputs if o.output_type == 'display_data' and 'image/png' in o.data]
    keep = os.environ.get('GREENMIM_EXAMPLES_OUT')
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for i, png in enumerate(figures):
            (Path(keep) / f'{name}-{i}.png').write_bytes(png)
    return summary, figures


def test_reconstruct(tiny_run, tmp_path):
    from greenmim.train import export
    weights = export(tiny_run, tmp_path / 'export')['model']
    summary, figures = execute('reconstruct', dict(model='green_swin_tiny', model_kwargs=TINY, weights=str(weights),
                                                   num_images=3, mask_ratios=[0.5, 0.75]), tmp_path)
    assert len(figures) == 2  # reconstructions, grouping
    assert sorted(summary['losses']) == ['0.5', '0.75'] and all(math.isfinite(v) for v in summary['losses'].values())
    for grouping in summary['grouping']:  # 12 of 49 units visible, 8x8 stage-1 tokens each
        assert grouping['visible'] == 12 * 64
        assert grouping['groups'] * grouping['group_size'] == grouping['visible'] + grouping['padding']
    assert [g['shift'] for g in summary['grouping']] == [[0, 0], [3, 3]]


def test_finetune(tiny_run, tmp_path):
    """Coffee-cup vs deep-space crops: easy enough for the tiny encoder to learn in 9 steps at a high lr."""
    data = make_two_class_folder(tmp_path / 'data', per_class=15, seed=0)
    tiny_files = [p.name for p in tiny_run.rglob('*') if p.is_file()]
    summary, figures = execute('finetune', dict(
        model='green_swin_tiny', model_kwargs=TINY, weights=str(tiny_run), dataset=str(data), epochs=3,
        batch_size=8, blr=0.2, max_train_images=None, num_workers=0, num_samples=4), tmp_path)
    assert len(figures) == 3  # loss curve, confusion matrix, sample predictions
    assert summary['classes'] == ['coffee', 'space'] and summary['eval_images'] == 6 and summary['train_images'] == 24
    confusion = torch.tensor(summary['confusion'])
    assert confusion.sum(1).tolist() == [3, 3]  # stratified held-out split
    assert summary['top1'] == pytest.approx(confusion.trace().item() / 6)
    assert summary['top1'] > 0.5 and summary['last_loss'] < summary['first_loss']
    assert sorted(p.name for p in tiny_run.rglob('*') if p.is_file()) == sorted(tiny_files)  # nothing written there


def test_convert_official(tiny_run, tmp_path):
    from greenmim.checkpoint import read_checkpoint
    from greenmim.mim import GreenMIM
    from greenmim.train.run_checkpoints import resolve_checkpoint
    mim = GreenMIM('green_swin_tiny', decoder_dim=32, **TINY)
    mim.load_state_dict(read_checkpoint(resolve_checkpoint(tiny_run))[0], strict=False)
    checkpoint = authors_greenmim(mim)
    checkpoint['model'] = early_merge_weights(checkpoint['model'])
    torch.save(checkpoint, tmp_path / 'authors.pth')
    out_dir = tmp_path / 'weights' / 'converted'
    summary, figures = execute('convert_official', dict(
        checkpoint=str(tmp_path / 'authors.pth'), out_dir=str(out_dir), model='green_swin_tiny', model_kwargs=TINY,
        num_images=2), tmp_path)
    assert len(figures) == 1
    losses = summary['merge_order_losses']
    assert sorted(losses) == ['early', 'swin'] and summary['merge_order'] == min(losses, key=losses.get)
    assert math.isfinite(summary['loss'])
    assert (out_dir / 'model.safetensors').is_file() and (out_dir / 'mim_decoder.safetensors').is_file()


def test_speed(tmp_path):
    summary, figures = execute('speed', dict(models=['green_swin_tiny'], model_kwargs=TINY, batch_size=2, steps=3,
                                             warmup=0), tmp_path)
    assert len(figures) == 1 and summary['interleave'] is True and summary['steps'] == 3  # a CPU: interleaved
    assert [r['method'] for r in summary['results']] == ['SimMIM', 'GreenMIM']
    simmim, green = summary['results']
    for r in summary['results']:
        assert r['step_q25_s'] <= r['step_s'] <= r['step_q75_s'] and r['images_per_s'] == pytest.approx(2 / r['step_s'])
    assert green['tflops_per_step'] > 0 and simmim['tflops_per_step'] > 0  # (this tiny encoder is cheaper than
    # GreenMIM's 512-wide decoder, so only real model sizes show GreenMIM's smaller count)
    flops_ratio = green['tflops_per_step'] / simmim['tflops_per_step']
    assert summary['flops_ratio']['green_swin_tiny'] == pytest.approx(flops_ratio)
    low, high = summary['speedup_spread']['green_swin_tiny']
    assert low <= summary['speedup']['green_swin_tiny'] <= high
    assert summary['noisy']['green_swin_tiny'] == (high - low > 0.25 * summary['speedup']['green_swin_tiny'])


def test_examples_extra_has_what_examples_readme_recommends():
    import tomllib
    extra = tomllib.loads((EXAMPLES.parent / 'pyproject.toml').read_text())['project']['optional-dependencies']
    assert {'papermill', 'ipywidgets', 'gdown'} <= {re.split(r'[<>=]', d)[0] for d in extra['examples']}


def first_cell_error(name, params, cwd):
    """Run ``examples/<name>.ipynb`` with ``params``; it must fail in its first code cell after the parameters:
    that cell's one error as ``(exception name, message, traceback lines)``."""
    book, first = _with_parameters(name, params)
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        _run(book, cwd)
    failed = [i for i, c in enumerate(book.cells) if any(o.output_type == 'error' for o in c.get('outputs', []))]
    assert failed == [first], (name, failed)
    error = next(o for o in book.cells[first].outputs if o.output_type == 'error')
    return error.ename, error.evalue, '\n'.join(error.traceback).splitlines()


def test_notebook_defaults_offline_fail_in_the_first_cell_saying_what_to_set(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv('https_proxy', 'http://127.0.0.1:9')  # no network for gdown (HF_HUB_OFFLINE=1: conftest)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    expected = {
        'convert_official': (r"weights/greenmim_swin_base_win7.pth is not there and Google Drive does not answer "
                             r"\(.*\): download https://drive.google.com/file/d/1vCt7QN3rNC7hmWlWYomqfhjUqN-PvR7a/view "
                             r"by hand and set checkpoint to the file$", {}),
        'reconstruct': (r"weights 'weights/greenmim_swin_base_win7/model.safetensors': no such file or folder. Set "
                        r"weights to a greenmim pretrain run folder, .*, a local-dir:/path folder or a Hub id "
                        r"org/name$", {}),
        'finetune': (r"^weights 'weights/greenmim_swin_base_win7/model.safetensors': no such file or folder", {}),
    }
    for name, (message, params) in expected.items():
        ename, evalue, traceback = first_cell_error(name, params, tmp_path)
        assert ename == 'FileNotFoundError' and re.search(message, evalue), (name, evalue)
        assert len(traceback) < 40 and not any('During handling' in line for line in traceback), (name, traceback)
    ename, evalue, _ = first_cell_error('finetune', dict(model='green_swin_tiny', model_kwargs=TINY,
                                                         weights=str(tiny_run)), tmp_path)
    assert re.fullmatch(r"dataset 'AI-Lab-Makerere/beans' \(split 'train'\) could not be loaded \(.*\): set dataset to "
                        r'a local image folder laid out root/<class>/<image>', evalue), evalue
    ename, evalue, _ = first_cell_error('reconstruct', dict(model='green_swin_tiny', model_kwargs=TINY,
                                                            weights=str(tiny_run), images='no/such/folder'), tmp_path)
    assert evalue.startswith("images 'no/such/folder': no such folder. Set images to a folder of your images"), evalue
    assert not list(tiny_run.rglob('*-timm'))  # a run folder as weights is exported outside the run
