"""The release manifest: which pretrained weights exist, where, from what, and how they were measured.

``hub/manifest.json`` (or the file named by ``GREENMIM_HUB_MANIFEST``) lists one :class:`Release` per
``model.tag``. It is the single source of truth for the registry: a tag gets a ``hf_hub_id`` in its timm
pretrained cfg only when its release is ``published``, so ``pretrained=True`` on a tag without weights fails at
once with timm's "No pretrained weights exist" instead of querying the Hub for a repository that does not exist.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

__all__ = ['Metric', 'Release', 'STATUSES', 'manifest_path', 'load_manifest', 'write_release']

STATUSES = ('published', 'not-published')
MANIFEST_ENV = 'GREENMIM_HUB_MANIFEST'


@dataclass(frozen=True)
class Metric:
    """One measured number and the command that measured it."""
    name: str  # e.g. 'top1'
    value: float
    dataset: str  # e.g. 'imagenet-1k/validation'
    command: str

    def __post_init__(self):
        if not self.command:
            raise ValueError(f'metric {self.name!r} has no command: record how it was measured')


@dataclass(frozen=True)
class Release:
    """A weights release for ``model.tag`` (status ``published`` or ``not-published``)."""
    model: str
    tag: str
    hub_id: str
    status: str
    license: str
    source_checkpoint: Optional[str] = None  # what was exported (path / run id), for published weights
    sha256: Optional[str] = None  # of model.safetensors
    decoder_sha256: Optional[str] = None  # of mim_decoder.safetensors (MIM tags)
    recipe: Dict[str, str] = field(default_factory=dict)
    metrics: Tuple[Metric, ...] = ()
    notes: str = ''

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f'{self.name}: status {self.status!r} is not one of {STATUSES}')
        if self.hub_id.count('/') != 1 or self.hub_id.startswith('timm/'):
            raise ValueError(f'{self.name}: hub_id {self.hub_id!r} must be a full "org/name" id outside timm/')
        if self.published and not (self.sha256 and self.source_checkpoint):
            raise ValueError(f'{self.name}: a published release needs sha256 and source_checkpoint')
        if not self.model or not self.tag:
            raise ValueError(f'release {self.model!r}.{self.tag!r} needs a model name and a tag')

    @property
    def name(self) -> str:
        """``model.tag``, the timm name with pretrained tag."""
        return f'{self.model}.{self.tag}'

    @property
    def published(self) -> bool:
        return self.status == 'published'

    @property
    def is_mim(self) -> bool:
        """A MIM-pretrained encoder (headless, ships the decoder), not a fine-tuned (``_ft_``) classifier."""
        return self.tag.startswith('mim_') and '_ft_' not in self.tag

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, entry: dict) -> 'Release':
        entry = dict(entry)
        try:
            entry['metrics'] = tuple(Metric(**m) for m in entry.get('metrics', ()))
            return cls(**entry)
        except TypeError as e:
            raise ValueError(f'bad manifest entry {entry.get("model")}.{entry.get("tag")}: {e}') from e


def manifest_path() -> Path:
    """``$GREENMIM_HUB_MANIFEST`` if set, else the manifest shipped in this package."""
    return Path(os.environ.get(MANIFEST_ENV) or Path(__file__).with_name('manifest.json'))


def load_manifest(path: Optional[Union[str, Path]] = None) -> Dict[str, Release]:
    """Releases keyed by ``model.tag``; raises ``ValueError`` naming a malformed or duplicated entry."""
    path = Path(path) if path is not None else manifest_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f'cannot read the release manifest {path}: {e}') from e
    releases = {}
    for entry in data.get('releases', ()):
        release = Release.from_dict(entry)
        if release.name in releases:
            raise ValueError(f'{path}: {release.name} is listed twice')
        releases[release.name] = release
    return releases


def write_release(release: Release, path: Optional[Union[str, Path]] = None) -> None:
    """Add ``release`` to the manifest at ``path``, replacing the entry of the same ``model.tag``."""
    path = Path(path) if path is not None else manifest_path()
    data = json.loads(path.read_text()) if path.exists() else {'schema': 1, 'releases': []}
    entries = [e for e in data['releases'] if f'{e["model"]}.{e["tag"]}' != release.name]
    data['releases'] = entries + [release.to_dict()]
    path.write_text(json.dumps(data, indent=2) + '\n')
