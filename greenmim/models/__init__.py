"""Green model families, registered in timm on import, with the family records and the release manifest that
train/ and hub/ read (:mod:`greenmim.models.family`, :mod:`greenmim.models.manifest`)."""
from .family import FAMILIES, ModelFamily, family_of
from .green_swin import GreenSwinTransformer
from .green_swinv2 import GreenSwinTransformerV2
from .green_twins import GreenTwins

__all__ = ['GreenSwinTransformer', 'GreenSwinTransformerV2', 'GreenTwins', 'ModelFamily', 'FAMILIES', 'family_of']
