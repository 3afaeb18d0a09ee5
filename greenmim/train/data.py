"""Image data sources for pre-training and fine-tuning.

A source is one of:

* ``None``: the embedded sample photographs shipped in :mod:`greenmim.data` (42 public-domain / CC0 images);
* a local folder of image files (searched recursively; for labels, ImageFolder layout ``root/<class>/<file>``);
* a local Parquet file or a folder of Parquet files (e.g. a Hugging Face dataset export);
* a local folder loaded by the Hugging Face ``imagefolder`` builder (``data_format='imagefolder'``);
* a Hugging Face Hub dataset name (``org/name``), optionally streamed.

Every sample is decoded here, not by ``datasets``: an unreadable (corrupt, truncated, not an image) or tiny image
becomes ``None`` and is dropped by :func:`collate_images`, which counts it, so a bad file never stops an epoch.
Augmentation randomness is seeded per sample from ``(seed, epoch, index)``: the same sample gets the same crop
whatever the number of workers or the point a run was resumed from.
"""
import copy
import io
import itertools
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, get_worker_info

from greenmim.data import IMAGES_DIR
from greenmim.layout import StageSpec, build_visible_layout, pack_layout
from greenmim.masking import random_mask

__all__ = [
    'IMAGE_EXTENSIONS', 'DATA_FORMATS', 'Batch', 'ImageFolderDataset', 'HFImageDataset', 'HFStreamingDataset',
    'ResumableSampler', 'build_dataset', 'collate_images', 'sample_seed', 'MaskCollate',
]

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
DATA_FORMATS = ('auto', 'folder', 'parquet', 'imagefolder', 'hub')


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for the augmentation of sample ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@contextmanager
def _seeded(seed: int):
    """Seed torch's CPU RNG and Python's ``random`` inside the block and restore both afterwards."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


def _decode(value: Any) -> Optional[Image.Image]:
    """An 8-bit RGB PIL image from a path, bytes, a ``{'bytes', 'path'}`` dict or a PIL image; ``None`` if unreadable.
    Integer grayscale (16-bit PNGs) is scaled from ``[0, 65535]`` to ``[0, 255]``."""
    try:
        if isinstance(value, dict):
            value = value.get('bytes') or value.get('path')
        if isinstance(value, (bytes, bytearray)):
            value = io.BytesIO(value)
        image = value if isinstance(value, Image.Image) else Image.open(value)
        if image.mode.startswith('I'):  # 16-bit grayscale (I;16*, or I from older Pillow): scale, not clip
            levels = np.asarray(image, dtype=np.float64) / 257.0  # forces the full decode
            image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), 'L')
        return image.convert('RGB')  # forces the full decode: truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


class _SampleSource:
    """Decoding, size check, seeded transform and epoch shared by the datasets below."""

    def __init__(self, transform: Optional[Callable], min_size: int, seed: int):
        self.transform = transform
        self.min_size = min_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _prepare(self, raw: Any, label: int, index: int) -> Optional[Tuple[Any, int]]:
        image = _decode(raw)
        if image is None or min(image.size) < self.min_size:
            return None
        if self.transform is None:
            return image, label
        with _seeded(sample_seed(self.seed, self.epoch, index)):
            return self.transform(image), label


class ImageFolderDataset(_SampleSource, Dataset):
    """Image files under ``root`` (recursive, sorted). With ``with_labels`` the first-level sub-folders are the
    classes (ImageFolder layout); otherwise labels are ``-1``. Files without an image extension are counted in
    :attr:`num_ignored` and left out."""

    def __init__(self, root, transform=None, with_labels: bool = False, min_size: int = 32, seed: int = 0):
        super().__init__(transform, min_size, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f'image folder {str(self.root)!r} does not exist')
        files = sorted(p for p in self.root.rglob('*') if p.is_file() and not p.name.startswith('.'))
        self.files = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        self.num_ignored = len(files) - len(self.files)
        if not self.files:
            raise ValueError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r} '
                             f'({len(files)} other files)')
        self.classes: List[str] = []
        self.labels = [-1] * len(self.files)
        if with_labels:
            top = [p.relative_to(self.root).parts for p in self.files]
            if any(len(parts) < 2 for parts in top):
                raise ValueError(f'{str(self.root)!r} has images outside class folders: labels need the layout '
                                 'root/<class>/<image>')
            self.classes = sorted({parts[0] for parts in top})
            self.labels = [self.classes.index(parts[0]) for parts in top]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def raw_image(self, index: int) -> Optional[Image.Image]:
        return _decode(self.files[index])

    def __getitem__(self, index: int):
        return self._prepare(self.files[index], self.labels[index], index)


def _columns(features, image_column: Optional[str], label_column: Optional[str]) -> Tuple[str, Optional[str]]:
    """The image and label columns of a ``datasets`` table: given, else the Image / ClassLabel feature or the
    conventional names."""
    import datasets
    names = list(features)
    if image_column is None:
        typed = [n for n, f in features.items() if isinstance(f, datasets.Image)]
        named = [n for n in ('image', 'img', 'pixel_values') if n in names]
        image_column = (typed or named or [None])[0]
        if image_column is None:
            raise ValueError(f'no image column among {names}: pass image_column')
    elif image_column not in names:
        raise ValueError(f'image column {image_column!r} not in {names}')
    if label_column is None:
        typed = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
        named = [n for n in ('label', 'labels') if n in names]
        label_column = (typed or named or [None])[0]
    elif label_column not in names:
        raise ValueError(f'label column {label_column!r} not in {names}')
    return image_column, label_column


def _num_classes(features, label_column: Optional[str]) -> int:
    import datasets
    feature = features.get(label_column) if label_column else None
    return feature.num_classes if isinstance(feature, datasets.ClassLabel) else 0


class HFImageDataset(_SampleSource, Dataset):
    """A map-style Hugging Face ``datasets.Dataset`` of images (decoded here, so bad images are skipped)."""

    def __init__(self, hf_dataset, transform=None, with_labels: bool = False, image_column: Optional[str] = None,
                 label_column: Optional[str] = None, min_size: int = 32, seed: int = 0):
        import datasets
        super().__init__(transform, min_size, seed)
        self.image_column, self.label_column = _columns(hf_dataset.features, image_column, label_column)
        if with_labels and self.label_column is None:
            raise ValueError(f'no label column among {list(hf_dataset.features)}: pass label_column')
        if isinstance(hf_dataset.features[self.image_column], datasets.Image):
            hf_dataset = hf_dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.dataset = hf_dataset
        self.with_labels = with_labels
        self.num_classes = _num_classes(hf_dataset.features, self.label_column) if with_labels else 0
        if with_labels and not self.num_classes:
            self.num_classes = int(max(hf_dataset[self.label_column])) + 1
        self.num_ignored = 0
        if len(hf_dataset) == 0:
            raise ValueError('the dataset is empty')

    def __len__(self) -> int:
        return len(self.dataset)

    def raw_image(self, index: int) -> Optional[Image.Image]:
        return _decode(self.dataset[index][self.image_column])

    def __getitem__(self, index: int):
        row = self.dataset[index]
        label = int(row[self.label_column]) if self.with_labels else -1
        return self._prepare(row[self.image_column], label, index)


class HFStreamingDataset(_SampleSource, IterableDataset):
    """A streamed Hugging Face ``datasets.IterableDataset``: shuffled with a buffer per epoch, split across ranks
    with ``split_dataset_by_node``, and resumed by skipping the samples this rank already consumed
    (:attr:`start`). Use with ``num_workers=0`` (the position is counted in the main process).

    Args:
        length: samples per epoch in total; from the dataset's split info when not given.
    """

    def __init__(self, hf_dataset, transform=None, with_labels: bool = False, image_column: Optional[str] = None,
                 label_column: Optional[str] = None, min_size: int = 32, seed: int = 0, length: Optional[int] = None,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000):
        import datasets
        super().__init__(transform, min_size, seed)
        features = hf_dataset.features
        if features is None:
            raise ValueError('the streamed dataset has no feature information: cannot find its image column')
        self.image_column, self.label_column = _columns(features, image_column, label_column)
        if isinstance(features[self.image_column], datasets.Image):
            hf_dataset = hf_dataset.cast_column(self.image_column, datasets.Image(decode=False))
        split_info = (hf_dataset.info.splits or {}).get(str(hf_dataset.split)) if hf_dataset.split else None
        total = length or (split_info.num_examples if split_info else 0)
        if not total:
            raise ValueError('the streamed dataset does not state its size: pass its number of samples (epoch_size)')
        self.dataset, self.with_labels, self.num_ignored = hf_dataset, with_labels, 0
        self.num_classes = _num_classes(features, self.label_column) if with_labels else 0
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.length = total // world_size
        self.start = 0

    def __len__(self) -> int:
        return self.length - self.start

    def raw_image(self, index: int) -> Optional[Image.Image]:
        row = next(itertools.islice(self.dataset, index, None))
        return _decode(row[self.image_column])

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node
        ds = self.dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(self.epoch)
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        for offset, row in enumerate(itertools.islice(ds, self.start, self.length)):
            label = int(row[self.label_column]) if self.with_labels else -1
            yield self._prepare(row[self.image_column], label, self.rank * self.length + self.start + offset)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed + epoch``, sharded by rank) that can start ``start`` samples into
    this rank's shard, to resume mid-epoch. Works without a process group (``num_replicas=1, rank=0``)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class Batch(NamedTuple):
    """``images [B, C, H, W]`` (``None`` if every sample was skipped), ``labels [B]``, the number skipped, and what
    the task's collate adds for its loss (pre-training: the batch's mask or packed layout, :class:`MaskCollate`)."""
    images: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    skipped: int
    inputs: Dict[str, Any] = {}


def collate_images(samples: Sequence[Optional[Tuple[torch.Tensor, int]]]) -> Batch:
    """Stack the readable samples and count the ``None`` ones (unreadable or tiny images)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return Batch(None, None, len(samples))
    images = torch.stack([s[0] for s in kept])
    labels = torch.tensor([s[1] for s in kept], dtype=torch.long)
    return Batch(images, labels, len(samples) - len(kept))


def _is_parquet_source(path: Path) -> bool:
    if path.is_file():
        return path.suffix == '.parquet'
    return any(path.rglob('*.parquet'))


def build_dataset(
        source: Optional[str] = None,
        transform: Optional[Callable] = None,
        with_labels: bool = False,
        data_format: str = 'auto',
        split: str = 'train',
        streaming: bool = False,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        min_size: int = 32,
        seed: int = 0,
        epoch_size: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
):
    """The dataset for ``source`` (see the module docstring); ``data_format`` one of :data:`DATA_FORMATS`.

    Returns a dataset whose items are ``(image_tensor, label)`` or ``None`` for a skipped image, with
    ``raw_image(i)``, ``set_epoch(e)``, ``num_classes`` and ``num_ignored`` (files left out by extension).
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f'data_format must be one of {DATA_FORMATS}, got {data_format!r}')
    common = dict(transform=transform, with_labels=with_labels, min_size=min_size, seed=seed)
    if source is None:
        if with_labels:
            raise ValueError('the embedded sample photos have no labels: give a labelled data source')
        return ImageFolderDataset(IMAGES_DIR, **common)
    path = Path(os.path.expanduser(str(source)))
    if data_format == 'folder' or (data_format == 'auto' and path.is_dir() and not _is_parquet_source(path)):
        return ImageFolderDataset(path, **common)

    import datasets
    hf = dict(image_column=image_column, label_column=label_column, **common)
    if data_format in ('parquet', 'imagefolder') or (data_format == 'auto' and path.exists()):
        if not path.exists():
            raise FileNotFoundError(f'data source {str(path)!r} does not exist')
        if data_format == 'imagefolder':
            args = dict(path='imagefolder', data_dir=str(path))
        elif _is_parquet_source(path):
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob('*.parquet'))
            args = dict(path='parquet', data_files={split: files})
        else:
            raise ValueError(f'{str(path)!r} is neither an image folder nor Parquet data')
    elif data_format in ('hub', 'auto'):
        if data_format == 'auto' and (str(source).startswith(('.', '/', '~')) or str(source).count('/') > 1):
            raise FileNotFoundError(f'data source {str(source)!r} does not exist')
        args = dict(path=str(source))
    try:
        hf_dataset = datasets.load_dataset(**args, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise ValueError(f'could not load data source {str(source)!r} (split {split!r}) with Hugging Face '
                         f'datasets: {e}') from e
    if streaming:
        return HFStreamingDataset(hf_dataset, **hf, length=epoch_size, rank=rank, world_size=world_size)
    return HFImageDataset(hf_dataset, **hf)


class MaskCollate:
    """DataLoader ``collate_fn`` of pre-training: :func:`collate_images`, then the batch's masks and (for GreenMIM)
    their CPU layout, drawn and built in the worker processes, so the training process only copies them to its
    device (:func:`greenmim.layout.layout_to`: one buffer, pinned by the loader).

    Args:
        specs: the encoder's ``layout_specs``; the mask grid is the last stage's.
        mask_ratio: as :func:`greenmim.masking.random_mask`.
        per_image: one mask per image (``[B, Hm, Wm]``) or one for the batch (``[Hm, Wm]``).
        layout: build the layout (GreenMIM) or pass the mask only (SimMIM, whose dense encoder takes no layout).
        static: static layouts (:mod:`greenmim.layout`; for a compiled step), else exact ones.
        group_size: fixed ``g_s`` of exact layouts.
        seed: the masks of the ``i``-th batch handed out by a loader made with :meth:`at` ``(epoch, first)`` come
            from a generator seeded by ``(seed, epoch, first + i)``, whatever the number of workers (a map-style
            DataLoader hands batches to its workers in turn), so a run that resumes at batch ``first`` draws the
            masks it would have.

    Returns a :class:`Batch` whose ``inputs`` hold ``packed`` (a :class:`~greenmim.layout.PackedLayout`) or
    ``mask``; none for a batch whose every image was unreadable.
    """

    def __init__(self, specs: Sequence[StageSpec], mask_ratio: float, per_image: bool, seed: int,
                 layout: bool = True, static: bool = False, group_size: Optional[int] = None):
        self.specs, self.mask_ratio, self.per_image, self.seed = tuple(specs), mask_ratio, per_image, seed
        self.layout, self.static, self.group_size = layout, static, group_size
        self.epoch, self.next_batch = 0, 0

    def at(self, epoch: int, first: int) -> 'MaskCollate':
        """A copy for a loader of ``epoch`` whose first batch is batch ``first`` of the epoch."""
        collate = copy.copy(self)
        collate.epoch, collate.next_batch = epoch, first
        return collate

    def _generator(self) -> torch.Generator:
        """The generator of the next batch's masks."""
        worker = get_worker_info()
        workers, rank = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        batch = self.next_batch + rank
        self.next_batch += workers  # this process's next batch
        seed = np.random.SeedSequence([self.seed, self.epoch, batch]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    def masks(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The masks of a batch: ``[B, Hm, Wm]`` per image, else ``[Hm, Wm]``."""
        return random_mask(self.specs[-1].grid_size, self.mask_ratio, generator,
                           batch_size if self.per_image else None)

    def __call__(self, samples) -> Batch:
        batch, generator = collate_images(samples), self._generator()
        if batch.images is None:
            return batch
        mask = self.masks(len(batch.images), generator)
        if not self.layout:
            return batch._replace(inputs={'mask': mask})
        layout = build_visible_layout(mask, self.specs, len(batch.images), torch.device('cpu'), self.group_size,
                                      self.static)
        return batch._replace(inputs={'packed': pack_layout(layout)})
