"""The one table of model families the cross-family tests run over: per family (and kind), a green model, its
timm original, kwargs that narrow it to 64 px (stage grids 16/8/4/2 under a 2x2 mask grid) and to a small model at
224 px (7x7 mask grid), and the independent dense computation its ``forward_visible`` must equal. A new family adds
one row here (and its dense reference in ``dense_reference.py``)."""
import re
from dataclasses import dataclass, field
from typing import Callable

import timm
import torch

import greenmim  # noqa: F401  (registers the green models)
from dense_reference import dense_key_masked_stages, dense_swinv2_key_masked_stages, dense_twins_key_masked_stages


@dataclass(frozen=True)
class Family:
    """A row of :data:`FAMILIES`.

    Attributes:
        model: the green model the tests build.
        original: ``green model name -> timm's model of the same layout`` (for every model of the family).
        small: kwargs narrowing ``model`` to 64 px.
        at_224: kwargs of a small ``model`` at 224 px.
        dense: ``(model, images, mask [Hm, Wm]) -> per-stage [B, N_s, C_s]``: the dense reference.
        names: the registered model names of this row (a regex).
    """
    model: str
    original: Callable[[str], str]
    small: dict
    at_224: dict
    dense: Callable
    names: str = field(default='')


_TWINS_224 = dict(embed_dims=(8, 16, 32, 64), depths=(2, 2, 2, 2))
FAMILIES = (
    Family('green_swin_tiny', lambda m: m[len('green_'):] + '_patch4_window7_224',
           dict(img_size=64, window_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
           dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)), dense_key_masked_stages,
           r'green_swin_[a-z]+'),
    Family('green_swinv2_tiny_window8_256', lambda m: m[len('green_'):],
           dict(img_size=64, window_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
           dict(img_size=224, window_size=7, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
           dense_swinv2_key_masked_stages, r'green_swinv2_\w+'),
    Family('green_twins_svt_small', lambda m: m[len('green_'):],
           dict(img_size=64, wss=(2, 2, 2, 2), embed_dims=(8, 16, 16, 32), depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
           _TWINS_224, dense_twins_key_masked_stages, r'green_twins_svt_\w+'),
    Family('green_twins_pcpvt_small', lambda m: m[len('green_'):],
           dict(img_size=64, embed_dims=(8, 16, 16, 32), depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
           dict(_TWINS_224, embed_dims=(8, 16, 40, 64)), dense_twins_key_masked_stages, r'green_twins_pcpvt_\w+'),
)
BY_MODEL = {f.model: f for f in FAMILIES}
_CLASSES = {f.model: type(timm.create_model(f.model, device='meta')) for f in FAMILIES}
ORIGINALS = {  # every registered green model: timm's model of the same layout
    name: f.original(name) for f in FAMILIES for name in timm.list_models('green_*') if re.fullmatch(f.names, name)}


def family_row(model: torch.nn.Module) -> Family:
    """The row of the family ``model`` belongs to (by its class, not its name)."""
    return next(f for f in FAMILIES if type(model) is _CLASSES[f.model])


def dense_stages(model, images, mask):
    """The dense reference of ``model``'s family."""
    return family_row(model).dense(model, images, mask)


def perturbed(name: str, **kwargs) -> torch.nn.Module:
    """``name`` (seeded, eval) with every parameter moved by ``N(0, 0.05)``: timm initialises some to zero or near it
    (bias tables, convolution biases, SwinV2's res-post-norms, which make each fresh block the identity)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model

