"""Release tooling: model cards, publish/convert commands and loading helpers (installed from the top-level ``hub/``
folder as ``greenmim.hub``; the release manifest it reads and writes is :mod:`greenmim.models.manifest`).

``python -m greenmim.hub.publish`` builds (and uploads) a Hub repository for one ``model.tag``;
``python -m greenmim.hub.convert`` turns the authors' GreenMIM/SimMIM checkpoints into this package's layout.
"""
from greenmim.models.manifest import Metric, Release, load_manifest

from .loading import load_mim_pretrained, load_pretrained

__all__ = ['Metric', 'Release', 'load_manifest', 'load_pretrained', 'load_mim_pretrained']
