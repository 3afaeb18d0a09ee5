"""``timm.create_model(..., pretrained=True)`` for the green models, with errors that say what is wrong.

timm already loads from the Hub (and its cache, ``HF_HUB_OFFLINE=1``), a local file
(``pretrained_cfg_overlay=dict(file=...)``) and a local folder (``"local-dir:/path"`` as the model name, or
``pretrained_cfg_overlay=dict(source="local-dir", file="/path")``). :func:`load_pretrained` takes the same names
and overlays (plus ``dict(hf_hub_id="local-dir:/path")``), but resolves and reads the weights itself first so that
a missing repository, a missing, truncated or corrupt file, a checkpoint of another architecture or a tag whose
weights are not published yet each raise an error naming the problem.
"""
from pathlib import Path
from typing import Any, Dict, Optional

import timm
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from timm.models import parse_model_name
from torch import nn

from greenmim.checkpoint import (
    DECODER_FILE, WEIGHTS_FILE, read_checkpoint, read_model_config, sha256_file, verify_state_dict)
from greenmim.mim import mim_from_metadata
from greenmim.offline import hub_reachable

from greenmim.models.family import family_of
from greenmim.models.manifest import load_manifest, no_weights_message

__all__ = ['load_pretrained', 'load_mim_pretrained', 'resolve_weights']

_LOCAL_DIR = 'local-dir:'


def _hub_error(error: Exception, hub_id: str, filename: str) -> FileNotFoundError:
    """A ``huggingface_hub`` download error as a ``FileNotFoundError`` that names the problem."""
    repo_id = hub_id.partition('@')[0]
    if isinstance(error, LocalEntryNotFoundError):  # subclass of EntryNotFoundError: test it first
        return FileNotFoundError(
            f'{hub_id}/{filename} is not in the HF cache ({constants.HF_HUB_CACHE}) and the Hub at '
            f'{constants.ENDPOINT} could not be asked (HF_HUB_OFFLINE=1 or no network)')
    if isinstance(error, RepositoryNotFoundError):
        return FileNotFoundError(
            f'no repository {repo_id} (or no {filename} in it) at {constants.ENDPOINT}; check the id, or log in '
            'if it is private')
    return FileNotFoundError(f'repository {repo_id} at {constants.ENDPOINT} has no file {filename}')


def _hub_file(hub_id: str, filename: str) -> Path:
    """``hf_hub_download`` of ``org/name[@revision]`` (HF cache, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``) with errors
    that name the problem."""
    repo_id, _, revision = hub_id.partition('@')
    hub_reachable(f'{hub_id}/{filename}')
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None, library_name='timm',
                                    library_version=timm.__version__))
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise _hub_error(e, hub_id, filename) from e


def _release_name(pretrained_cfg: Dict[str, Any]) -> str:
    return f'{pretrained_cfg.get("architecture")}.{pretrained_cfg.get("tag")}'


def resolve_weights(pretrained_cfg: Dict[str, Any], filename: str = WEIGHTS_FILE) -> Path:
    """Local path of ``filename`` for a model's resolved pretrained cfg: from the Hub/HF cache (``hf_hub_id``),
    a ``local-dir`` folder, or (for the weights file only) ``file``. Raises ``FileNotFoundError`` or
    ``ValueError`` (no source) naming the problem."""
    if pretrained_cfg.get('source') == 'local-dir':
        folder = Path(pretrained_cfg['file'])
        if not folder.is_dir():
            raise FileNotFoundError(f'local-dir {folder} is not a directory')
        if not (folder / filename).is_file():
            raise FileNotFoundError(f'local-dir {folder} has no {filename} (it has: '
                                    f'{", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"})')
        return folder / filename
    if pretrained_cfg.get('file'):
        path = Path(pretrained_cfg['file'])
        if filename != WEIGHTS_FILE:
            path = path.with_name(filename)
        if not path.is_file():
            raise FileNotFoundError(f'checkpoint file {path} does not exist')
        return path
    if pretrained_cfg.get('hf_hub_id'):
        if filename == WEIGHTS_FILE:
            filename = pretrained_cfg.get('hf_hub_filename') or filename
        return _hub_file(pretrained_cfg['hf_hub_id'], filename)
    raise ValueError(no_weights_message(_release_name(pretrained_cfg)))


def _overlay(pretrained_cfg_overlay: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Accept ``hf_hub_id="local-dir:/path"`` (timm 1.0.31 would send it to the Hub) as a local folder."""
    overlay = dict(pretrained_cfg_overlay or {})
    hub_id = overlay.get('hf_hub_id') or ''
    if hub_id.startswith(_LOCAL_DIR):
        overlay.update(hf_hub_id=None, source='local-dir', file=hub_id[len(_LOCAL_DIR):])
    return overlay or None


def _check_published_file(pretrained_cfg: Dict[str, Any], path: Path, digest_field: str = 'sha256') -> None:
    """A file downloaded for a published release must be the file that was published: its sha256 must be the
    release's ``digest_field`` (``sha256`` for the weights, ``decoder_sha256`` for the MIM decoder)."""
    release = load_manifest().get(_release_name(pretrained_cfg))
    if release is None or not release.published or pretrained_cfg.get('hf_hub_id') != release.hub_id:
        return
    expected, digest = getattr(release, digest_field), sha256_file(path)
    if expected is None:
        raise ValueError(f'the manifest records no {digest_field} for the published {release.name}: cannot check '
                         f'{path}')
    if digest != expected:
        raise ValueError(f'{path} (sha256 {digest[:12]}...) is not the published {release.name} '
                         f'(sha256 {expected[:12]}...): delete it from the cache and download again')


def load_pretrained(
        model_name: str,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """``timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=..., **kwargs)``, checked.

    Args:
        model_name: ``"green_swin_base.mim_in1k"``, ``"hf-hub:org/name"`` or ``"local-dir:/path"``.
        pretrained_cfg_overlay: weights source override: ``dict(file=...)``, ``dict(hf_hub_id="org/name")``,
            ``dict(hf_hub_id="local-dir:/path")`` or ``dict(source="local-dir", file="/path")``.
        **kwargs: model kwargs, as for ``timm.create_model``.

    Raises:
        FileNotFoundError: missing repository, file or folder, or not in the cache while offline.
        ValueError: no weights for this tag yet; truncated or corrupt file, or a broken ``config.json``; weights
            for another patch or window size (never resampled: the message names the size to pass); a checkpoint
            that does not fit the model (lists missing, unexpected and mismatched keys); a download that differs
            from the published sha256.
    """
    if model_name.startswith(_LOCAL_DIR):
        read_model_config(model_name[len(_LOCAL_DIR):])  # a broken config.json: a ValueError naming it
    if model_name.startswith('hf-hub:'):
        hub_reachable(model_name)
    try:
        model = timm.create_model(
            model_name, pretrained=False, pretrained_cfg_overlay=_overlay(pretrained_cfg_overlay), **kwargs)
    except (RepositoryNotFoundError, EntryNotFoundError) as e:  # hf-hub: names read config.json first
        raise _hub_error(e, parse_model_name(model_name)[1], 'config.json') from e
    pretrained_cfg = model.pretrained_cfg
    path = resolve_weights(pretrained_cfg)
    _check_published_file(pretrained_cfg, path)
    state_dict = read_checkpoint(path)[0]
    family = family_of(model)
    if family is not None:  # the size check before the family's filter (timm's) would resample to fit
        family.check_not_resampled(state_dict, model)
        state_dict = family.original_to_timm(state_dict, model)
    reference = model.state_dict()
    classifier = pretrained_cfg.get('classifier')
    if classifier and pretrained_cfg.get('num_classes') != model.num_classes:  # adapting the head, as timm does
        for key in (f'{classifier}.weight', f'{classifier}.bias'):
            state_dict.pop(key, None)
            reference.pop(key, None)
    verify_state_dict(state_dict, reference, f'{model_name} ({type(model).__name__})', source=path)
    model.load_state_dict(state_dict, strict=False)
    return model


def load_mim_pretrained(model_name: str, pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, **kwargs):
    """A :class:`greenmim.GreenMIM` / :class:`greenmim.SimMIM` (encoder and decoder) from a ``.mim_*`` release, to
    continue pre-training: the encoder as :func:`load_pretrained`, the decoder from ``mim_decoder.safetensors``
    beside it (same repository, folder, or the file's folder); a downloaded decoder of a published release must
    match the manifest's ``decoder_sha256``."""
    encoder = load_pretrained(model_name, pretrained_cfg_overlay, **kwargs)
    path = resolve_weights(encoder.pretrained_cfg, DECODER_FILE)
    _check_published_file(encoder.pretrained_cfg, path, 'decoder_sha256')
    decoder, metadata = read_checkpoint(path)
    try:
        mim = mim_from_metadata(encoder, metadata)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    reference = {k: v for k, v in mim.state_dict().items() if not k.startswith('encoder.')}
    verify_state_dict(decoder, reference, f'the {type(mim).__name__} decoder for {model_name}', source=path)
    mim.load_state_dict(decoder, strict=False)
    return mim

