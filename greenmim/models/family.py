"""What the training and release code need to know about a family of green models, one record per family.

A family module (``green_swin.py``, ``green_twins.py``) registers its :class:`ModelFamily`; :mod:`greenmim.hub`
(model cards, loading, conversion) looks it up with :func:`family_of` instead of assuming one architecture.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ['ModelFamily', 'FAMILIES', 'register_family', 'family_of']

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelFamily:
    """A family of green models (every size is an instance of ``model_class``).

    Attributes:
        name: in prose, e.g. ``'Swin Transformer'``.
        hub_tag: the model-card tag, e.g. ``'swin-transformer'``.
        model_class: the timm model class.
        models: the registered model names.
        original_to_timm: ``(state_dict, model) -> state_dict``: the original (authors') key layout to timm's,
            as timm's ``pretrained_filter_fn``.
        check_not_resampled: ``(state_dict, model) -> None``: raise ``ValueError`` naming the size to pass when the
            weights (either layout) were made for another patch or window size than ``model``, which
            ``original_to_timm`` would resample or silently accept (the pixel patch embedding:
            :func:`greenmim.checkpoint.check_patch_not_resampled`, and the family's position tables); loading and
            ``convert`` run it before ``original_to_timm``.
        describe: ``model -> str``: the architecture in a line, e.g. ``'widths 96/192/384/768, depths 2/2/6/2'``.
        features_shape: the shape of ``forward_features`` of one image, e.g. ``'[1, H/32, W/32, C]'``.
    """
    name: str
    hub_tag: str
    model_class: type
    models: Tuple[str, ...]
    original_to_timm: Callable[[StateDict, nn.Module], StateDict]
    check_not_resampled: Callable[[StateDict, nn.Module], None]
    describe: Callable[[nn.Module], str]
    features_shape: str


FAMILIES: List[ModelFamily] = []


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES.append(family)
    return family


def family_of(model: nn.Module) -> Optional[ModelFamily]:
    """The family ``model`` belongs to, ``None`` for other models."""
    return next((f for f in FAMILIES if isinstance(model, f.model_class)), None)
