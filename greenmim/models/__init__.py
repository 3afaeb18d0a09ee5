"""Green model families, registered in timm on import."""
from .green_swin import GreenSwinTransformer

__all__ = ['GreenSwinTransformer']
