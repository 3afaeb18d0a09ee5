"""The checkpoint file format: one definition for training, export, the release tooling and the MIM wrappers.

Files:

- ``model.safetensors`` (:data:`WEIGHTS_FILE`) holds one of three state dicts: a **MIM** wrapper's
  (:class:`~greenmim.GreenMIM` / :class:`~greenmim.SimMIM`: the encoder under ``encoder.``, the decoder and
  ``mask_token`` beside it; :func:`is_mim_state_dict`), an **encoder** alone in timm's layout (no head), or a timm
  **classifier**.
- ``mim_decoder.safetensors`` (:data:`DECODER_FILE`) holds the rest of a MIM state dict (decoder, ``mask_token``),
  beside an encoder's ``model.safetensors``: :func:`split_mim_state_dict` gives the two parts.

Metadata (the safetensors header, strings; written by :func:`weights_metadata`):

- ``format``: ``'greenmim'``, the writer;
- ``kind``: ``'mim'``, ``'encoder'``, ``'decoder'`` or ``'classifier'``;
- ``model``, ``model_kwargs``: the timm model name and the JSON kwargs that rebuild it; ``greenmim_version``;
- ``mim_class``, ``mim_kwargs`` (``mim`` and ``decoder`` files): the wrapper and the JSON kwargs that rebuild it
  around the encoder (:func:`wrapper_metadata`);
- provenance where known: ``method`` (pre-training), ``source``, ``merge_order`` (conversion).

Compatibility: ``greenmim convert`` used to write the target's class name (``GreenMIM``, ``SimMIM``,
``GreenSwinTransformer``) into ``format``, with no ``kind`` or ``mim_class``; :func:`wrapper_metadata` still reads
the wrapper from there. Nothing else depends on ``format`` or ``kind``: a MIM checkpoint is recognised by its keys.
"""
import argparse
import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import safetensors
import safetensors.torch
import torch
from torch import nn

__all__ = [
    'WEIGHTS_FILE', 'DECODER_FILE', 'FORMAT', 'KINDS', 'weights_metadata', 'wrapper_metadata', 'is_mim_state_dict',
    'split_mim_state_dict', 'read_checkpoint', 'check_written_for', 'verify_state_dict', 'load_verified',
    'sha256_file', 'load_torch_file', 'read_model_config', 'check_patch_not_resampled', 'HUB_CONFIG_FILE',
    'save_weights', 'follow_umask',
]

WEIGHTS_FILE = 'model.safetensors'
HUB_CONFIG_FILE = 'config.json'  # timm's model config in a Hub-format folder
DECODER_FILE = 'mim_decoder.safetensors'
FORMAT = 'greenmim'
KINDS = ('mim', 'encoder', 'decoder', 'classifier')
WRAPPERS = ('GreenMIM', 'SimMIM')

StateDict = Dict[str, torch.Tensor]
_SHOWN = 8  # keys listed per kind of problem in an error message


def weights_metadata(kind: str, model: str, model_kwargs: Mapping, wrapper: Optional[nn.Module] = None,
                     **provenance: str) -> Dict[str, str]:
    """The safetensors metadata of a ``kind`` file of ``model`` (see the module docstring); ``wrapper`` (the
    GreenMIM / SimMIM module) adds ``mim_class`` and ``mim_kwargs``."""
    from greenmim import __version__
    if kind not in KINDS:
        raise ValueError(f'checkpoint kind {kind!r} is not one of {KINDS}')
    metadata = {'format': FORMAT, 'kind': kind, 'model': model, 'model_kwargs': json.dumps(dict(model_kwargs)),
                'greenmim_version': __version__}
    if wrapper is not None:
        metadata.update(mim_class=type(wrapper).__name__, mim_kwargs=json.dumps(wrapper.wrapper_kwargs()))
    return dict(metadata, **provenance)


def wrapper_metadata(metadata: Mapping[str, str]) -> Dict[str, str]:
    """``mim_class`` and ``mim_kwargs`` of a file's metadata (those present), reading ``mim_class`` from ``format``
    in files converted by earlier versions."""
    wrapper = {k: metadata[k] for k in ('mim_class', 'mim_kwargs') if k in metadata}
    if 'mim_class' not in wrapper and metadata.get('format') in WRAPPERS:
        wrapper['mim_class'] = metadata['format']
    return wrapper


def is_mim_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A GreenMIM / SimMIM state dict: the encoder's keys are under ``encoder.``."""
    return any(k.startswith('encoder.') for k in state_dict)


def split_mim_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Tuple[StateDict, StateDict]:
    """A MIM state dict -> ``(encoder, decoder)``: the encoder's keys without ``encoder.`` (timm's layout), and
    every other key (decoder and mask token) unchanged."""
    encoder = {k[len('encoder.'):]: v for k, v in state_dict.items() if k.startswith('encoder.')}
    decoder = {k: v for k, v in state_dict.items() if not k.startswith('encoder.')}
    return encoder, decoder


def read_checkpoint(path: Union[str, Path]) -> Tuple[StateDict, Dict[str, str]]:
    """``(state_dict, metadata)`` of a ``.safetensors`` file or a torch checkpoint (``{"model": ...}`` /
    ``{"state_dict": ...}`` wrappers removed; no metadata), on the CPU. A ``.safetensors`` file whose metadata does
    not name its model takes the ``architecture`` of a timm ``config.json`` beside it (a folder ``publish`` wrote).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, corrupt or holds no state dict; the ``config.json`` beside it is broken.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist' + (' (it is a directory)' if path.is_dir() else ''))
    if path.suffix != '.safetensors':
        checkpoint = load_torch_file(path)
        for wrapper in ('model', 'state_dict'):
            if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
                checkpoint = checkpoint[wrapper]
        if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise ValueError(f'checkpoint {path} holds no state dict (a mapping of names to tensors)')
        return dict(checkpoint), {}
    try:
        with safetensors.safe_open(path, 'pt') as f:
            metadata = f.metadata() or {}
        state_dict = safetensors.torch.load_file(path, device='cpu')
    except Exception as e:  # safetensors raises several types for the same kinds of damage
        raise _unreadable(path, e) from e
    if 'model' not in metadata and (path.parent / HUB_CONFIG_FILE).is_file():
        architecture = read_model_config(path.parent).get('architecture')
        if architecture:
            metadata = dict(metadata, model=architecture)
    return state_dict, metadata


def load_torch_file(path: Union[str, Path]):
    """``torch.load(path, weights_only=True)`` on the CPU (an ``argparse.Namespace``, as training scripts save
    beside their weights, is allowed).

    Raises:
        ValueError: the file holds another Python object (named: it is not unpickled, for safety), or it is
            truncated, corrupt or not a torch file.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if refused is None:
            raise _unreadable(path, e) from e
        raise ValueError(
            f'{path} holds Python objects other than tensors and plain containers ({refused.group(1)}), which are '
            'not unpickled for safety. If you trust the file, load it with torch.load(path, weights_only=False) '
            'and save its tensors alone') from e
    except Exception as e:  # torch raises several types for the same kinds of damage
        raise _unreadable(path, e) from e


def _unreadable(path: Path, error: Exception) -> ValueError:
    kind = 'safetensors' if path.suffix == '.safetensors' else 'torch'
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return ValueError(
        f'{path} ({path.stat().st_size} bytes) cannot be read: it is truncated, corrupt or not a {kind} file '
        f'({type(error).__name__}: {first_line}). Delete it and download, export or save it again.')


def read_model_config(folder: Union[str, Path]) -> Dict:
    """The timm ``config.json`` of a model folder (``architecture``, ``num_classes``, ``model_args``, ...).

    Raises:
        FileNotFoundError: no ``config.json`` in ``folder``.
        ValueError: it is not a JSON object (the message names the file).
    """
    path = Path(folder) / HUB_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist')
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path} is not valid JSON ({e})') from e
    if not isinstance(config, dict):
        raise ValueError(f'{path} holds {type(config).__name__}, not a JSON object')
    return config


def check_written_for(metadata: Mapping[str, str], model_name: str, source) -> None:
    """Raise ``ValueError`` if the metadata names another architecture than ``model_name`` (tags ignored)."""
    written_for = metadata.get('model')
    if written_for and written_for.split('.')[0] != model_name.split('.')[0]:
        raise ValueError(f'checkpoint {str(source)!r} was written for model {written_for!r}, not {model_name!r}: '
                         f'pass --model {written_for} or another checkpoint')


def verify_state_dict(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str,
                      source=None, optional: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has exactly the keys and shapes of ``reference`` (a model's
    ``state_dict``); keys of ``reference`` starting with one of ``optional`` may be missing.

    The message names the ``source`` file and ``what`` it was checked against (e.g. ``"green_swin_base
    (GreenSwinTransformer)"``), counts the keys found and lists the first missing, unexpected and mismatched keys.
    """
    missing = [k for k in reference if k not in state_dict and not k.startswith(tuple(optional))]
    unexpected = [k for k in state_dict if k not in reference]
    mismatched = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(reference[k].shape)}'
        for k in reference if k in state_dict and state_dict[k].shape != reference[k].shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for label, items in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
        if items:
            more = f' ... and {len(items) - _SHOWN} more' if len(items) > _SHOWN else ''
            problems.append(f'{len(items)} {label}: ' + ', '.join(items[:_SHOWN]) + more)
    found = sum(k in state_dict for k in reference)
    name = f'checkpoint {str(source)!r}' if source is not None else 'checkpoint'
    raise ValueError(f'{name} does not fit {what} ({found}/{len(reference)} keys found): ' + '; '.join(problems)
                     + '. Was it written for another model or model size?')


def check_patch_not_resampled(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                               key: str = 'patch_embed.proj.weight') -> None:
    """Raise ``ValueError`` when ``state_dict`` holds the pixel patch embedding ``key`` for another patch size than
    ``model``'s: timm's checkpoint filters silently resample it to fit, which changes what the weights compute. The
    message names the size to pass. Each family's ``check_not_resampled`` (:class:`greenmim.models.ModelFamily`)
    starts with this and adds its own resampled tables."""
    reference = model.state_dict()
    if key in state_dict and key in reference and state_dict[key].shape[-2:] != reference[key].shape[-2:]:
        v = state_dict[key]
        raise ValueError(f'{key}: checkpoint {tuple(v.shape)} vs model {tuple(reference[key].shape)}: the '
                         f'checkpoint uses patch size {tuple(v.shape[-2:])}: pass patch_size={v.shape[-1]} (it is '
                         'not resampled)')


def load_verified(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, source=None,
                  optional: Sequence[str] = ()) -> None:
    """:func:`verify_state_dict` against ``model``, then load ``state_dict`` into it."""
    verify_state_dict(state_dict, model.state_dict(), what, source, optional)
    model.load_state_dict(state_dict, strict=False)


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def follow_umask(path: Union[str, Path]) -> None:
    """Give ``path`` the mode a new file gets under the process umask (``safetensors`` writes files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_weights(tensors: Mapping[str, torch.Tensor], path: Union[str, Path],
                 metadata: Optional[Mapping[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` of contiguous CPU copies of ``tensors``, with the umask's file mode."""
    safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
                                metadata=dict(metadata) if metadata is not None else None)
    follow_umask(path)
