"""benchmarks/cifar10_evidence.py: the smoke run end to end on a synthetic CIFAR-like Parquet, and its comparison."""
import importlib.util
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


@pytest.fixture(scope='module')
def evidence():
    spec = importlib.util.spec_from_file_location('cifar10_evidence',
                                                  os.path.join(ROOT, 'benchmarks', 'cifar10_evidence.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cifar_like(path, rows: int, seed: int) -> None:
    """``rows`` random 32x32 JPEGs in the columns of the real files: ``image`` (Image feature), ``label``
    (ClassLabel of CIFAR-10's classes)."""
    import datasets
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(rows):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format='JPEG')
        images.append({'bytes': buffer.getvalue(), 'path': None})
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=CLASSES))
    datasets.Dataset.from_dict(dict(image=images, label=[i % 10 for i in range(rows)]),
                               features=features).to_parquet(str(path))


def test_smoke_run_writes_every_init_with_one_finetuning_recipe(evidence, tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    _cifar_like(data / 'train.parquet', 24, seed=0)
    _cifar_like(data / 'test.parquet', 20, seed=1)
    out, work = tmp_path / 'result.json', tmp_path / 'work'
    evidence.main(['--smoke', '--data-dir', str(data), '--work-dir', str(work), '--out', str(out)])

    result = json.loads(out.read_text())
    assert result['status'] == 'complete' and {'device', 'torch', 'commit', 'date'} <= set(result['env'])
    assert sorted((r['init'], r['seed']) for r in result['runs']) == [
        (init, seed) for init in ('greenmim', 'scratch', 'simmim') for seed in (0, 1)]
    for run in result['runs']:
        assert 0 <= run['top1'] <= 100 and run['test_images'] == 16
        assert (run['finetune_epochs'], run['finetune_images'], run['finetune_subset']) == (1, 16, 16)
    for method in ('greenmim', 'simmim'):
        pre = result['pretrain'][method]
        assert pre['wall_s'] > 0 and pre['images'] == 16 * pre['epochs'] and len(pre['epoch_losses']) == pre['epochs']
        assert pre['loss_curve'] and all(np.isfinite(c[2]) for c in pre['loss_curve'])
    assert set(result['summary']['per_init']) == {'greenmim', 'scratch', 'simmim'}
    assert out.with_suffix('.png').stat().st_size > 0

    # every init was fine-tuned with the same settings but for its weights, seed and folder
    configs = {(r['init'], r['seed']): json.loads((work / f'finetune_{r["init"]}_seed{r["seed"]}' / 'config.json')
                                                  .read_text()) for r in result['runs']}
    own = {'checkpoint', 'seed', 'output_dir'}
    reference = {k: v for k, v in configs['scratch', 0].items() if k not in own}
    assert all({k: v for k, v in c.items() if k not in own} == reference for c in configs.values())
    assert configs['scratch', 1]['checkpoint'] is None
    assert configs['greenmim', 0]['checkpoint'] == result['pretrain']['greenmim']['checkpoint']


def test_compare_needs_the_difference_to_exceed_twice_the_larger_seed_range(evidence):
    runs = [dict(init='scratch', top1=50.0), dict(init='scratch', top1=51.0),
            dict(init='greenmim', top1=53.5), dict(init='greenmim', top1=54.5),
            dict(init='simmim', top1=52.0), dict(init='simmim', top1=53.6)]
    summary = evidence.compare(runs)
    assert summary['per_init']['scratch'] == dict(n=2, mean=50.5, std=0.71, min=50.0, max=51.0, range=1.0)
    assert summary['versus_scratch']['greenmim'] == dict(diff_vs_scratch=3.5, spread=1.0, beyond_twice_spread=True)
    # 2.3 above scratch, but the seeds of simmim spread by 1.6: not beyond 3.2
    assert summary['versus_scratch']['simmim'] == dict(diff_vs_scratch=2.3, spread=1.6, beyond_twice_spread=False)
    assert evidence.compare(runs[:3])['versus_scratch'] == {}  # one greenmim seed: no spread to compare with
