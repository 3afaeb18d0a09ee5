"""Data sources and bad inputs: missing/empty sources, non-image files, corrupt and tiny images, Parquet."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from greenmim.data import IMAGES_DIR
from greenmim.train import pretrain
from greenmim.train.data import HFImageDataset, HFStreamingDataset, ImageFolderDataset, build_dataset
from greenmim.train.transforms import pretrain_transform
from train_fixtures import copy_photos, tiny_pretrain_config


def test_embedded_default_is_real_photos_with_licence():
    dataset = build_dataset(None)
    assert isinstance(dataset, ImageFolderDataset) and len(dataset) == 42
    assert dataset.num_ignored == 1  # LICENSE.md
    licence = (IMAGES_DIR / 'LICENSE.md').read_text()
    stems = {p.name.rsplit('_', 1)[0] for p in IMAGES_DIR.glob('*.jpg')}
    assert all(f'`{stem}_*.jpg`' in licence for stem in stems)
    sizes = [Image.open(p).size for p in IMAGES_DIR.glob('*.jpg')]
    assert max(max(s) for s in sizes) <= 256 and sum(p.stat().st_size for p in IMAGES_DIR.glob('*')) < 2e6


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        build_dataset(str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        build_dataset(str(tmp_path / 'nowhere'), data_format='folder')
    with pytest.raises(ValueError, match='no image files'):
        build_dataset(str(tmp_path))
    (tmp_path / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match=r'no image files .* \(1 other files\)'):
        build_dataset(str(tmp_path))
    with pytest.raises(ValueError, match='have no labels'):
        build_dataset(None, with_labels=True)


def test_corrupt_tiny_and_non_image_files_are_skipped_and_counted(tmp_path):
    data = copy_photos(tmp_path / 'data', 7)
    (data / 'readme.txt').write_text('not an image')
    (data / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')
    good = (data / sorted(p.name for p in data.glob('*.jpg'))[0]).read_bytes()
    (data / 'truncated.jpg').write_bytes(good[:len(good) // 3])
    Image.new('RGB', (8, 8), 'red').save(data / 'tiny.png')
    dataset = build_dataset(str(data), pretrain_transform(64))
    assert len(dataset) == 10 and dataset.num_ignored == 1
    assert sum(dataset[i] is None for i in range(len(dataset))) == 3
    # a full epoch over every file (batch 2 -> 5 steps) runs to the end and counts the 3 skipped images
    summary = pretrain(tiny_pretrain_config(tmp_path / 'run', data=str(data), batch_size=2))
    assert summary.steps == 5 and summary.images_skipped == 3
    assert all(torch.isfinite(torch.tensor(summary.losses)))


def _write_parquet(path, count: int):
    rows = []
    for i, src in enumerate(sorted(IMAGES_DIR.glob('*.jpg'))[:count]):
        rows.append({'image': {'bytes': src.read_bytes(), 'path': src.name}, 'label': i % 2})
    rows.append({'image': {'bytes': b'broken', 'path': 'broken.jpg'}, 'label': 0})
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_source_map_style_and_streaming(tmp_path):
    _write_parquet(tmp_path / 'train.parquet', 5)
    dataset = build_dataset(str(tmp_path / 'train.parquet'), pretrain_transform(64), with_labels=True)
    assert isinstance(dataset, HFImageDataset) and len(dataset) == 6
    items = [dataset[i] for i in range(6)]
    assert items[-1] is None and [it[1] for it in items[:5]] == [0, 1, 0, 1, 0]
    assert items[0][0].shape == (3, 64, 64)
    streamed = build_dataset(str(tmp_path), pretrain_transform(64), streaming=True, epoch_size=6,
                             rank=1, world_size=2)
    assert isinstance(streamed, HFStreamingDataset) and len(streamed) == 3
    got = list(streamed)
    assert len(got) == 3 and all(x is None or x[0].shape == (3, 64, 64) for x in got)


def test_imagefolder_format_and_unknown_hub_dataset(tmp_path):
    copy_photos(tmp_path / 'imgs' / 'a', 2)
    copy_photos(tmp_path / 'imgs' / 'b', 2, prefix='rocket')
    dataset = build_dataset(str(tmp_path / 'imgs'), data_format='imagefolder', with_labels=True)
    assert isinstance(dataset, HFImageDataset) and len(dataset) == 4 and dataset.num_classes == 2
    with pytest.raises(ValueError, match='could not load data source'):
        build_dataset('no-such-org/no-such-dataset-greenmim')


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    dataset = build_dataset(None, pretrain_transform(64), seed=3)
    first = dataset[5][0]
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(dataset[5][0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[5][0], first)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG (Pillow mode I;16) keeps its tones: 65535 is white, 32768 mid-grey, 0 black."""
    import numpy as np
    from greenmim.train.data import _decode
    ramp = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(ramp).save(tmp_path / 'deep.png')
    assert Image.open(tmp_path / 'deep.png').mode.startswith('I')
    rgb = np.asarray(_decode(tmp_path / 'deep.png'))
    assert rgb.shape == (4, 4, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0].tolist() == [[0] * 3, [64] * 3, [128] * 3, [255] * 3]
