"""Pictures for the example notebooks: photos in, reconstructions, image grids, a confusion matrix, and the
Optimal Grouping of a mask.

matplotlib is imported by the plotting functions only (``pip install -e '.[examples]'``).
"""
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from greenmim.data import IMAGES_DIR
from greenmim.train.data import IMAGE_EXTENSIONS
from greenmim.train.reconstruction import reconstruct

__all__ = ['load_images', 'denormalize', 'image_table', 'reconstruction_table', 'image_grid', 'plot_confusion_matrix',
           'GroupingMap', 'grouping_map', 'plot_grouping']


def load_images(model, count: int, folder=None) -> Tuple[torch.Tensor, dict]:
    """``count`` images spread over ``folder`` (sorted, searched recursively; default: the photos shipped with
    greenmim), preprocessed by timm's eval transform for ``model``'s pretrained cfg: ``(images [N, 3, H, W],
    data_config)``."""
    paths = sorted(p for p in Path(folder or IMAGES_DIR).rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {folder}')
    paths = [paths[i * len(paths) // count] for i in range(min(count, len(paths)))]
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config)
    return torch.stack([transform(Image.open(p).convert('RGB')) for p in paths]), config


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Normalised images ``[B, C, H, W]`` -> pixels in ``[0, 1]`` on the CPU."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.detach().float().cpu() * std + mean).clamp(0, 1)


def _show(ax, image: torch.Tensor) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def image_table(columns: Dict[str, torch.Tensor], size: float = 2.2):
    """One column per entry of ``columns`` (title -> images ``[B, 3, H, W]`` in ``[0, 1]``), one row per image."""
    import matplotlib.pyplot as plt
    rows = len(next(iter(columns.values())))
    fig, axes = plt.subplots(rows, len(columns), figsize=(size * len(columns), size * rows), squeeze=False)
    for c, (title, images) in enumerate(columns.items()):
        axes[0, c].set_title(title, fontsize=10)
        for r in range(rows):
            _show(axes[r, c], images[r])
    fig.tight_layout()
    return fig


@torch.no_grad()
def reconstruction_table(mim, images: torch.Tensor, masks: Sequence[torch.Tensor], data_config: dict):
    """Columns original | masked | reconstruction for each mask (one mask for the whole batch, as in
    training), one row per image, un-normalised with ``data_config``'s mean and std: ``(figure, losses)``, the
    MIM loss of each mask."""
    mean, std = data_config['mean'], data_config['std']
    columns, losses = {'original': denormalize(images, mean, std)}, []
    for mask in masks:
        losses.append(mim(images, mask=mask).loss.item())
        masked, recon = reconstruct(mim, images, mask)
        ratio = f'{1 - mask.float().mean().item():.0%} masked'
        columns[ratio] = denormalize(masked, mean, std)
        columns[f'reconstruction ({ratio})'] = denormalize(recon, mean, std)
    return image_table(columns), losses


def image_grid(images: torch.Tensor, titles: Sequence[str], colors: Optional[Sequence[str]] = None,
               ncols: int = 4, size: float = 2.6):
    """Images ``[N, 3, H, W]`` in ``[0, 1]`` with a title each (optionally coloured), ``ncols`` per row."""
    import matplotlib.pyplot as plt
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + 0.4) * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):
            _show(ax, images[i])
            ax.set_title(titles[i], fontsize=9, color=colors[i] if colors else 'black')
        else:
            ax.axis('off')
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], ax=None):
    """Counts ``matrix[true, predicted]`` as a heat map with the count in each cell."""
    import matplotlib.pyplot as plt
    n = len(class_names)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1.0 + 0.8 * n))
    ax.imshow(matrix, cmap='Blues')
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, int(count), ha='center', va='center',
                color='white' if count > matrix.max() / 2 else 'black')
    ax.set_xticks(range(n), class_names, rotation=30, ha='right')
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.figure.tight_layout()
    return ax.figure


class GroupingMap(NamedTuple):
    """The Optimal Grouping of one stage's visible tokens under one (window, shift) block configuration.

    Attributes:
        group: ``[Rh, Rw]`` group of each token of the stage grid, -1 for masked tokens.
        segment: ``[Rh, Rw]`` attention segment (window, and shift region under shifted windows), -1 when masked.
        slots: ``[G, S]`` segment held by each slot of each group, -1 for a padding slot.
        stage: the stage (0-based); ``window_size``, ``shift_size``: the block configuration.
    """
    group: np.ndarray
    segment: np.ndarray
    slots: np.ndarray
    stage: int
    window_size: Tuple[int, int]
    shift_size: Tuple[int, int]

    @property
    def num_visible(self) -> int:
        return int((self.group >= 0).sum())

    @property
    def num_padding(self) -> int:
        return int((self.slots < 0).sum())


def grouping_map(encoder, mask: torch.Tensor, stage: int = 0, shifted: bool = False) -> GroupingMap:
    """The grouping that ``encoder.forward_visible`` (a green Swin) uses for ``mask`` at ``stage``, for its
    blocks with (``shifted=True``) or without shifted windows."""
    layout = encoder.visible_layout(mask, 1, torch.device('cpu'))[stage]
    configs = [key for key in layout.attention if any(key[1]) == shifted]
    if not configs:
        raise ValueError(f'stage {stage} has no block with{"" if shifted else "out"} shifted windows '
                         f'(its blocks: {list(layout.attention)})')
    (window, shift) = configs[0]
    attention = layout.attention[(window, shift)]
    index, segment = attention.index.numpy(), attention.segment.numpy()
    rh, rw = layout.grid_size
    raster = layout.token_index.numpy()
    group, seg = np.full(rh * rw, -1), np.full(rh * rw, -1)
    filled = index >= 0
    group[raster[index[filled]]] = np.nonzero(filled)[0]
    seg[raster[index[filled]]] = segment[filled]
    return GroupingMap(group.reshape(rh, rw), seg.reshape(rh, rw), segment.astype(np.int64), stage,
                       tuple(window), tuple(shift))


def _group_colors(num_groups: int) -> np.ndarray:
    import matplotlib.pyplot as plt
    palette = np.concatenate([plt.get_cmap(name).colors for name in ('tab20', 'tab20b', 'tab20c')])[:, :3]
    return palette[np.arange(num_groups) % len(palette)]


def _boundaries(labels: np.ndarray):
    """Line segments between 4-neighbours with different labels where at least one is >= 0."""
    lines = []
    for axis in (0, 1):
        a, b = (labels[:-1], labels[1:]) if axis == 0 else (labels[:, :-1], labels[:, 1:])
        for r, c in np.argwhere((a != b) & ((a >= 0) | (b >= 0))):
            if axis == 0:
                lines.append([(c - .5, r + .5), (c + .5, r + .5)])
            else:
                lines.append([(c + .5, r - .5), (c + .5, r + .5)])
    return lines


def plot_grouping(gmap: GroupingMap, axes=None):
    """Two panels: the stage's token grid coloured by group (masked tokens grey; black lines between attention
    segments, dotted lines along the window partition), and the groups as rows of ``g_s`` slots (one shade per
    segment, padding hatched)."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw=dict(width_ratios=[1, 1.1]))
    grid_ax, slot_ax = axes
    num_groups, group_size = gmap.slots.shape
    colors = _group_colors(num_groups)
    image = np.full(gmap.group.shape + (3,), 0.88)
    image[gmap.group >= 0] = colors[gmap.group[gmap.group >= 0]]
    grid_ax.imshow(image, interpolation='nearest')
    (rh, rw), (wh, ww), (sh, sw) = gmap.group.shape, gmap.window_size, gmap.shift_size
    for r in range(sh % wh, rh + 1, wh):  # the (shifted) window partition, faint
        grid_ax.axhline(r - .5, color='0.6', lw=0.5, ls=':')
    for c in range(sw % ww, rw + 1, ww):
        grid_ax.axvline(c - .5, color='0.6', lw=0.5, ls=':')
    grid_ax.add_collection(LineCollection(_boundaries(gmap.segment), colors='black', linewidths=0.8))
    for s in np.unique(gmap.segment[gmap.segment >= 0]):  # group number at the centre of each segment
        rows, cols = np.nonzero(gmap.segment == s)
        grid_ax.text(cols.mean(), rows.mean(), str(gmap.group[rows[0], cols[0]]), ha='center', va='center',
                     fontsize=7)
    shift = f', shift {gmap.shift_size[0]}' if any(gmap.shift_size) else ''
    grid_ax.set_title(f'stage {gmap.stage + 1} ({gmap.group.shape[0]}x{gmap.group.shape[1]} tokens, window '
                      f'{gmap.window_size[0]}{shift}): {gmap.num_visible} visible tokens', fontsize=10)
    grid_ax.set_xticks([])
    grid_ax.set_yticks([])

    shades = np.ones((num_groups, group_size, 3))
    for g in range(num_groups):
        segments = list(dict.fromkeys(gmap.slots[g][gmap.slots[g] >= 0]))
        for k, s in enumerate(segments):
            shades[g, gmap.slots[g] == s] = colors[g] * (1.0 if k % 2 == 0 else 0.7)
    slot_ax.imshow(shades, aspect='auto', interpolation='nearest')
    for g, s in np.argwhere(gmap.slots < 0):
        slot_ax.add_patch(Rectangle((s - .5, g - .5), 1, 1, fill=False, hatch='///', edgecolor='0.5', lw=0))
    slot_ax.set_yticks(range(num_groups))
    slot_ax.tick_params(axis='y', labelsize=7)
    slot_ax.set_xlabel(f'slot (g_s = {group_size})')
    slot_ax.set_ylabel('group')
    slot_ax.set_title(f'{num_groups} groups x {group_size} slots: {gmap.num_padding} padding slots '
                      f'({gmap.num_padding / max(gmap.num_visible, 1):.1%} of the visible tokens)', fontsize=10)
    return grid_ax.figure
