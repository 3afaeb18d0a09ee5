"""Package data: the embedded sample photographs (``images/``, see ``images/LICENSE.md``)."""
from pathlib import Path

IMAGES_DIR = Path(__file__).parent / 'images'

__all__ = ['IMAGES_DIR']
