"""The release manifest: which pretrained weights exist, where, from what, and how they were measured.

``greenmim/models/manifest.json`` (or the file named by ``GREENMIM_HUB_MANIFEST``) lists one :class:`Release` per
``model.tag``. It is the one table of releases: the model families build their timm pretrained cfgs from it
(:func:`pretrained_cfgs`), and the release tooling (:mod:`greenmim.hub`) reads and writes it. A tag gets a
``hf_hub_id`` in its cfg only when its release is ``published``, so ``pretrained=True`` on a tag without weights
fails at once (:func:`require_weights_source`: the tag, "not published yet" and how to load your own weights)
instead of querying the Hub for a repository that does not exist.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

__all__ = ['Metric', 'Release', 'STATUSES', 'TAGS', 'is_mim_tag', 'manifest_path', 'load_manifest', 'write_release',
           'pretrained_cfgs', 'PAPER_CFG', 'no_weights_message', 'require_weights_source']

STATUSES = ('published', 'not-published')
PAPER_CFG = {  # in the timm cfg of every green model
    'license': 'apache-2.0', 'paper_ids': 'arXiv:2205.13515',
    'paper_name': 'Green Hierarchical Vision Transformer for Masked Image Modeling',
}
MANIFEST_ENV = 'GREENMIM_HUB_MANIFEST'
TAGS = ('mim_in1k_ft_in1k', 'mim_in1k')  # the pretrained tags of every green model (the first is the default);
# the manifest may list more for a model, e.g. the authors' converted checkpoints (mim_in1k_authors)


def is_mim_tag(tag: str) -> bool:
    """A MIM-pretrained encoder (headless, ships the decoder), not a fine-tuned (``_ft_``) classifier."""
    return tag.startswith('mim_') and '_ft_' not in tag


@dataclass(frozen=True)
class Metric:
    """One number and where it comes from: the command that measured it, or (for a number not measured here,
    e.g. the authors' accuracy of a converted checkpoint) ``reported_by``, a link to where it was reported."""
    name: str  # e.g. 'top1'
    value: float
    dataset: str  # e.g. 'imagenet-1k/validation'
    command: str = ''
    reported_by: str = ''

    def __post_init__(self):
        if not (self.command or self.reported_by):
            raise ValueError(f'metric {self.name!r} has no command: record how it was measured (or reported_by: '
                             'where it was reported)')


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
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # timm kwargs the weights need, e.g. window_size
    release_command: str = ''  # for a release still to make: the command a maintainer with network runs

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
        return is_mim_tag(self.tag)

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


def _release_cfg(base_cfg: dict, release: Optional[Release]) -> dict:
    """``base_cfg`` with the weights source of ``release``: the full hub id, set only for a published release,
    the licence, and notes (an unpublished tag says so; the model kwargs the weights need; the recipe step by
    step)."""
    if release is None:
        return dict(base_cfg)
    status = () if release.published else (
        f'NOT YET PUBLISHED: no weights at {release.hub_id} yet. {release.notes}'.strip(),)
    kwargs = (f'create with {", ".join(f"{k}={v!r}" for k, v in release.model_kwargs.items())}',
              ) if release.model_kwargs else ()
    return dict(base_cfg, hf_hub_id=release.hub_id if release.published else None, license=release.license,
                notes=status + kwargs + tuple(f'{step}: {how}' for step, how in release.recipe.items()))


def pretrained_cfgs(models: Sequence[str], base_cfg: dict) -> Dict[str, dict]:
    """timm pretrained cfgs of every ``model.tag`` of ``models`` (:data:`TAGS`, and any other tag the manifest
    lists for the model), for ``generate_default_cfgs``.

    ``base_cfg`` is the family's cfg (input size, mean/std, classifier name, ...), completed with the paper and the
    licence (:data:`PAPER_CFG`); ``num_classes`` is 0 for MIM tags, 1000 for the fine-tuned classifiers. The
    classifier is the default tag (``*``) whether or not weights are published yet.
    """
    releases = load_manifest()
    tags = {model: TAGS + tuple(r.tag for r in releases.values() if r.model == model and r.tag not in TAGS)
            for model in models}
    return {
        f'{model}.{tag}{"*" if tag == TAGS[0] else ""}': _release_cfg(
            {**PAPER_CFG, **base_cfg, 'num_classes': 0 if is_mim_tag(tag) else 1000}, releases.get(f'{model}.{tag}'))
        for model in models for tag in tags[model]
    }


def no_weights_message(name: str) -> str:
    """Why ``name`` (``model.tag``) has no weights to load, and how to load one's own."""
    release = load_manifest().get(name)
    status = (f'not published yet (planned at {release.hub_id})' if release is not None and not release.published
              else 'no weights source')
    return (f'No pretrained weights exist for {name}: {status}. Load your own with '
            "pretrained_cfg_overlay=dict(file='export/model.safetensors') after `greenmim export runs/pretrain` "
            "(greenmim.hub.sources.weights_overlay('runs/pretrain') exports a run folder for you), the authors' "
            'checkpoints after `greenmim convert`, or use pretrained=False. See docs/hub.md; `greenmim models` lists '
            'every tag and its weights')


def require_weights_source(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> None:
    """Before timm builds ``variant`` with ``pretrained=True``: ``RuntimeError`` (:func:`no_weights_message`) when
    the resolved cfg (tag and ``pretrained_cfg_overlay`` from ``kwargs``) names no weights source; for weights on
    the Hub, :func:`greenmim.offline.hub_reachable` (offline at once, from the HF cache, when it does not answer)."""
    if not pretrained:
        return
    from timm.models import resolve_pretrained_cfg

    from greenmim.offline import hub_reachable
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    if not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        raise RuntimeError(no_weights_message(f'{cfg.architecture or variant}.{cfg.tag}'))
    if cfg.hf_hub_id and not cfg.file and cfg.source != 'local-dir':
        hub_reachable(cfg.hf_hub_id)
