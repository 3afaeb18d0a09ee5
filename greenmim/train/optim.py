"""Optimizer and learning-rate schedule: AdamW with decoupled weight decay, per-iteration warmup + cosine.

Weight decay skips every parameter with ``ndim <= 1`` (norms, biases) and the model's ``no_weight_decay()``
names (position tables: Swin's relative position bias tables, the mask token); both rules are timm's
``param_groups_weight_decay``. With ``layer_decay`` the groups are timm's ``param_groups_layer_decay`` over the
model's ``group_matcher`` (each group's ``lr_scale`` is applied by the scheduler).
"""
from typing import Optional, Tuple

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

__all__ = ['scaled_lr', 'build_optimizer', 'build_scheduler']


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int = 256) -> float:
    """The linear scaling rule: ``base_lr * batch_size / base_batch_size`` (``batch_size`` = effective batch)."""
    return base_lr * batch_size / base_batch_size


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.05,
                    betas: Tuple[float, float] = (0.9, 0.95), layer_decay: Optional[float] = None,
                    fused: bool = False):
    """AdamW over ``model``'s trainable parameters, no decay on ``ndim <= 1`` and ``no_weight_decay()`` names;
    ``fused``: PyTorch's fused (one kernel, CUDA) implementation, else its multi-tensor ``foreach`` one."""
    return create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=weight_decay, betas=betas,
                               layer_decay=layer_decay, **({'fused': True} if fused else {'foreach': True}))


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> CosineLRScheduler:
    """Linear warmup from 0 over ``warmup_steps`` optimizer steps, then cosine to ``min_lr`` at ``total_steps``.
    Call ``step_update(step)`` before each optimizer step (a pure function of ``step``)."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
