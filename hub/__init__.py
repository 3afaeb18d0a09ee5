"""Release tooling: the manifest of published weights, model cards, publish/convert commands and loading helpers.

``python -m greenmim.hub.publish`` builds (and uploads) a Hub repository for one ``model.tag``;
``python -m greenmim.hub.convert`` turns the authors' GreenMIM/SimMIM checkpoints into this package's layout.
"""
from .loading import load_mim_pretrained, load_pretrained
from .manifest import Metric, Release, load_manifest

__all__ = ['Metric', 'Release', 'load_manifest', 'load_pretrained', 'load_mim_pretrained']
