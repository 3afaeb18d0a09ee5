"""Image transforms: the GreenMIM pre-training recipe, timm's fine-tuning recipe, and evaluation."""
from typing import Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms as T

__all__ = ['pretrain_transform', 'finetune_transform', 'eval_transform']


def pretrain_transform(input_size: int, scale: Tuple[float, float] = (0.2, 1.0),
                       mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> T.Compose:
    """PIL image -> ``[3, input_size, input_size]``: RandomResizedCrop(scale 0.2-1, bicubic), horizontal flip,
    ImageNet normalisation (the paper's pre-training augmentation)."""
    return T.Compose([
        T.RandomResizedCrop(input_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def finetune_transform(input_size: int, auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1-mmax9',
                       re_prob: float = 0.25, color_jitter: Optional[float] = None):
    """timm's training transform (RandomResizedCrop, flip, RandAugment, random erasing), as in MAE/SimMIM.

    The RandAugment policy is MAE/SimMIM's ``rand-m9-mstd0.5-inc1`` with the noisy magnitude capped at 9
    (``mmax9``): at magnitude 10 timm's increasing posterize keeps 0 bits, which Pillow 13 rejects with a
    ``ValueError`` (about 1 image in 600), stopping the epoch.
    """
    return create_transform(input_size, is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                            re_mode='pixel', re_count=1, color_jitter=color_jitter, interpolation='bicubic',
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def eval_transform(input_size: int, crop_pct: float = 0.875):
    """Resize to ``input_size / crop_pct`` (bicubic), centre crop, ImageNet normalisation."""
    return create_transform(input_size, is_training=False, crop_pct=crop_pct, interpolation='bicubic',
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
