"""``greenmim models``: every green model and pretrained tag, its image size and whether its weights are published.

Weights load with ``timm.create_model("<model>.<tag>", pretrained=True)`` only where published; see docs/hub.md to
load your own (``pretrained_cfg_overlay=dict(file=...)``) or convert the authors' checkpoints.
"""
import argparse
from typing import List, Tuple

import timm
from timm.models import get_pretrained_cfg

from .family import FAMILIES
from .manifest import load_manifest

__all__ = ['model_table', 'add_arguments', 'run']


def model_table(pattern: str = '*') -> List[Tuple[str, str, str, str]]:
    """``(model, tag, image size, weights)`` rows of the green models matching ``pattern``; the default tag (what
    ``timm.create_model(model)`` takes) ends in ``*``."""
    releases, rows, matching = load_manifest(), [], set(timm.list_models(pattern))
    for model in sorted(m for family in FAMILIES for m in family.models if m in matching):
        default = get_pretrained_cfg(model).tag
        for name in timm.list_models(model, include_tags=True):
            size = get_pretrained_cfg(name).input_size
            release = releases.get(name)
            weights = (f'published: {release.hub_id}' if release and release.published else
                       'not published yet' + (f' (planned: {release.hub_id})' if release else ''))
            tag = name.partition('.')[2]
            rows.append((model, tag + '*' * (tag == default), f'{size[-2]}x{size[-1]}', weights))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('pattern', nargs='?', default='green_*', help='model names to list (a timm pattern)')


def run(args: argparse.Namespace) -> int:
    rows = model_table(args.pattern)
    if not rows:
        raise ValueError(f'no green model matches {args.pattern!r} (greenmim models lists them all)')
    header = ('model', 'tag', 'image size', 'weights')
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)) + '  ' + row[3])
    print('*: the default tag. pretrained=True works for published tags only; to load your own weights: docs/hub.md')
    return 0
