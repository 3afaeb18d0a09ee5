"""Helpers shared by the training commands: config dataclasses <-> command-line flags, seeds, autocast dtype."""
import argparse
import ast
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Dict, Optional, Tuple, get_args, get_type_hints

import numpy as np
import torch

from .data import DATA_FORMATS

__all__ = ['amp_dtype', 'derived_seed', 'add_config_arguments', 'config_from_args', 'config_command', 'COMMON_HELP']


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
    """One ``--flag`` per dataclass field of ``config_cls`` (bools as ``--flag/--no-flag``), its own fields before
    those it inherits (the ``RunConfig`` ones)."""
    defaults, hints = config_cls(), get_type_hints(config_cls)
    inherited = {f.name for base in config_cls.__mro__[1:] if is_dataclass(base) for f in fields(base)}
    for f in sorted(fields(config_cls), key=lambda f: f.name in inherited):
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


COMMON_HELP = {
    'model': 'green model name registered in timm',
    'model_kwargs': 'extra timm model kwargs, e.g. window_size=14 depths="(2,2,18,2)"',
    'data_format': f'one of {DATA_FORMATS}',
    'batch_size': 'images per device and micro-batch',
    'accum_iter': 'micro-batches per optimizer step',
    'resume': 'checkpoint folder, run folder or its checkpoints/ folder to continue exactly',
    'max_steps': 'stop after this many optimizer steps in total, with a checkpoint (schedule unchanged)',
    'compile': 'torch.compile the model step as one graph of static shapes, compiled once (pre-training: static '
               'layouts built in the loader workers)',
    'cuda_graphs': 'with --compile on CUDA: replay the compiled step as CUDA graphs (mode reduce-overhead)',
}


def config_command(config_cls, train: Callable, help_text: Dict[str, str]) -> Tuple[Callable, Callable]:
    """``(add_arguments, run)`` of the ``greenmim`` subcommand that runs ``train(config_cls(...))``, one flag per
    config field (help from :data:`COMMON_HELP` and ``help_text``)."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, config_cls, {**COMMON_HELP, **help_text})

    def run(args: argparse.Namespace) -> int:
        train(config_from_args(config_cls, args))
        return 0

    return add_arguments, run
