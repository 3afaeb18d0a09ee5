"""Green model families, registered in timm on import, with the family records and the release manifest that
train/ and hub/ read (:mod:`greenmim.models.family`, :mod:`greenmim.models.manifest`)."""
from .family import FAMILIES, ModelFamily, family_of
from .green_swin import GreenSwinTransformer
from .green_twins import GreenTwins

__all__ = ['GreenSwinTransformer', 'GreenTwins', 'ModelFamily', 'FAMILIES', 'family_of']
