"""Up-front checks of a training run's settings (``PretrainConfig`` / ``FinetuneConfig``): every value that cannot
work is refused with a ``ValueError`` naming its flag, before any data is read, model built or file written.

The rules are keyed by field name and apply to whichever of those fields a config has (:data:`BOUNDS`), plus the
model name (:func:`check_model_name`). Checks that need the model (image size vs. windows, the mask ratio vs. the
mask grid) run right after it is built, still before any data or output.
"""
import math
from dataclasses import dataclass
from typing import Any

from greenmim.checkpoint import read_model_config

from .run_checkpoints import training_state_file

__all__ = ['Bound', 'BOUNDS', 'flag_name', 'check_config', 'check_model_name']


@dataclass(frozen=True)
class Bound:
    """The values a setting accepts: a finite number in ``[low, high]`` (an end excluded where ``*_open``), an
    integer if ``integer``, and ``None`` if ``optional``."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not isinstance(value, int):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        kind = 'an integer' if self.integer else 'a number'
        if math.isinf(self.high):
            text = f'{kind} {">" if self.low_open else ">="} {self.low:g}'
        else:
            text = (f'{kind} in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}'
                    f'{")" if self.high_open else "]"}')
        return text + (' (or unset)' if self.optional else '')


_POSITIVE_INT = Bound(1, integer=True)
_COUNT = Bound(0, integer=True)
_FRACTION = Bound(0, 1, high_open=True)
BOUNDS = {
    'batch_size': _POSITIVE_INT, 'accum_iter': _POSITIVE_INT, 'epochs': _POSITIVE_INT,
    'save_every': _POSITIVE_INT, 'log_every': _POSITIVE_INT, 'keep_last': _POSITIVE_INT,
    'input_size': Bound(1, integer=True, optional=True), 'decoder_dim': _POSITIVE_INT, 'decoder_depth': _POSITIVE_INT,
    'vis_images': _POSITIVE_INT, 'min_image_size': _POSITIVE_INT,
    'max_steps': Bound(1, integer=True, optional=True), 'epoch_size': Bound(1, integer=True, optional=True),
    'num_classes': Bound(2, integer=True, optional=True),
    'num_workers': _COUNT, 'vis_every': _COUNT, 'seed': _COUNT,
    'lr': Bound(0, low_open=True, optional=True), 'blr': Bound(0, low_open=True),
    'min_lr': Bound(0), 'weight_decay': Bound(0), 'warmup_epochs': Bound(0),
    'clip_grad': Bound(0, low_open=True, optional=True),
    'mask_ratio': Bound(0, 1, low_open=True, high_open=True),
    'drop_path': _FRACTION, 'smoothing': _FRACTION, 'reprob': Bound(0, 1), 'mixup': Bound(0), 'cutmix': Bound(0),
    'layer_decay': Bound(0, 1, low_open=True),
    'betas': _FRACTION,  # each of the two
}


def flag_name(field: str) -> str:
    """The command-line flag of a config field: ``save_every`` -> ``--save-every``."""
    return '--' + field.replace('_', '-')


def check_config(config) -> None:
    """Raise ``ValueError`` naming the first setting of ``config`` outside its :data:`BOUNDS`, an image size in
    the model kwargs or an unknown model; ``FileNotFoundError`` for a ``resume`` checkpoint that is not there."""
    for field, bound in BOUNDS.items():
        if not hasattr(config, field):
            continue
        value = getattr(config, field)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not all(bound.allows(v) for v in values):
            each = ' each' if isinstance(value, (tuple, list)) else ''
            raise ValueError(f'{flag_name(field)} must{each} be {bound.describe()}, got {value!r}')
    if 'img_size' in getattr(config, 'model_kwargs', {}):
        raise ValueError('set the image size with --input-size, not --model-kwargs img_size=...')
    check_model_name(config.model)
    if config.resume is not None:
        training_state_file(config.resume)  # the checkpoint and its training state exist


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` unless timm knows ``name`` (with ``import greenmim``, the green models); for a
    ``local-dir:`` name, its ``config.json`` must be readable and name a known architecture."""
    import timm
    if name.startswith('local-dir:'):
        architecture = read_model_config(name[len('local-dir:'):]).get('architecture')
        if not architecture or not timm.is_model(architecture):
            raise ValueError(f'{name}: config.json names architecture {architecture!r}, which is not a registered '
                             'model')
        return
    if name.startswith('hf-hub:'):
        return  # resolved (and checked) by timm against the Hub
    if not timm.is_model(name):
        green = timm.list_models('green_*')
        raise ValueError(f'unknown model {name!r}: not a timm model name (greenmim registers {", ".join(green)})')
