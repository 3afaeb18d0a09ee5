"""greenmim: GreenMIM pre-training of hierarchical vision transformers on visible patches only.

``import greenmim`` registers the green models in timm (``timm.create_model("green_swin_base")``).
"""
from . import models
from .grouping import optimal_grouping
from .layout import build_visible_layout
from .masking import num_visible, random_mask
from .mim import GreenMIM, MIMOutput, SimMIM

__version__ = '0.1.0'
__all__ = ['GreenMIM', 'SimMIM', 'MIMOutput', 'random_mask', 'num_visible', 'optimal_grouping',
           'build_visible_layout']
