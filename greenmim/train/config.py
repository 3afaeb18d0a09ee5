"""Helpers shared by the training commands: config dataclasses <-> command-line flags, seeds, autocast dtype."""
import argparse
import ast
from dataclasses import fields
from typing import Any, Dict, Optional, get_args, get_type_hints

import numpy as np
import torch

__all__ = ['amp_dtype', 'derived_seed', 'add_config_arguments', 'config_from_args']


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` (``auto``: bf16 on CUDA, none on the CPU)."""
    choices = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}
    if amp == 'auto':
        return torch.bfloat16 if device.type == 'cuda' else None
    if amp not in choices:
        raise ValueError(f'amp must be auto, bf16, fp16 or none, got {amp!r}')
    return choices[amp]


def derived_seed(seed: int, rank: int, purpose: int) -> int:
    """An independent 32-bit seed per (run seed, rank, purpose)."""
    return int(np.random.SeedSequence([seed, rank, purpose]).generate_state(1)[0])


def _kwargs(pairs) -> Dict[str, Any]:
    """``['window_size=4', 'depths=(2,2,2,2)']`` -> ``{'window_size': 4, 'depths': (2, 2, 2, 2)}``."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition('=')
        if not sep:
            raise ValueError(f'model kwarg {pair!r} is not key=value')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def add_config_arguments(parser: argparse.ArgumentParser, config_cls, help_text: Dict[str, str]) -> None:
    """One ``--flag`` per dataclass field of ``config_cls`` (bools as ``--flag/--no-flag``)."""
    defaults, hints = config_cls(), get_type_hints(config_cls)
    for f in fields(config_cls):
        flag, default = '--' + f.name.replace('_', '-'), getattr(defaults, f.name)
        doc = help_text.get(f.name, '')
        if f.name == 'model_kwargs':
            parser.add_argument(flag, nargs='*', metavar='KEY=VALUE', default=[], help=doc)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=doc)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=type(default[0]), nargs=len(default), default=default, help=doc)
        else:
            kind = hints[f.name]
            kind = next((a for a in get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
            parser.add_argument(flag, type=kind, default=default, help=f'{doc} (default: {default})')


def config_from_args(config_cls, args: argparse.Namespace):
    """The ``config_cls`` instance for flags parsed by :func:`add_config_arguments`."""
    values = {f.name: getattr(args, f.name) for f in fields(config_cls)}
    values.update({k: tuple(v) for k, v in values.items() if isinstance(v, list) and k != 'model_kwargs'})
    values['model_kwargs'] = _kwargs(values.get('model_kwargs'))
    return config_cls(**values)
