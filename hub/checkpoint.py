"""Reading and verifying checkpoint files, with errors that say what is wrong."""
import argparse
import hashlib
import pickle
import re
from pathlib import Path
from typing import Dict, Mapping, Union

import safetensors.torch
import torch

__all__ = ['read_state_dict', 'verify_state_dict', 'sha256_file']

_SHOWN = 8  # keys listed per kind of problem in an error message


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (``{"model": ...}`` / ``{"state_dict": ...}``
    wrappers removed), on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, corrupt or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist' + (' (it is a directory)' if path.is_dir() else ''))
    size = path.stat().st_size
    try:
        if path.suffix == '.safetensors':
            return safetensors.torch.load_file(path, device='cpu')
        # training scripts (MAE, SimMIM, GreenMIM) save their argparse.Namespace next to the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        raise ValueError(
            f'checkpoint {path} holds Python objects other than tensors and plain containers '
            f'({found.group(1) if found else "see the cause"}), which are not unpickled for safety. If you trust '
            'the file, re-save its state dict alone: torch.save(torch.load(path, weights_only=False)["model"], '
            'new_path)') from e
    except Exception as e:  # safetensors and torch raise several types for the same kinds of damage
        raise ValueError(
            f'checkpoint {path} ({size} bytes) cannot be read: it is truncated, corrupt or not a '
            f'{"safetensors" if path.suffix == ".safetensors" else "torch"} file ({type(e).__name__}: {e}). '
            'Delete it and download or export it again.') from e
    for wrapper in ('model', 'state_dict'):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f'checkpoint {path} holds no state dict (a mapping of names to tensors)')
    return dict(checkpoint)


def verify_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor],
        what: str,
) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has exactly the keys and shapes of ``reference``.

    The message lists missing keys, unexpected keys and shape mismatches (the first few of each) and names
    ``what`` the checkpoint was checked against, e.g. ``"green_swin_base (timm layout)"``.
    """
    missing = [k for k in reference if k not in state_dict]
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
    covered = len(reference) - len(missing)
    raise ValueError(
        f'checkpoint does not match {what} ({covered}/{len(reference)} keys found): ' + '; '.join(problems)
        + ('. It looks like a checkpoint of another architecture or size.' if covered < len(reference) / 2 else ''))
