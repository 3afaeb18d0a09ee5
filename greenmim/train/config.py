"""Helpers shared by the training commands: config dataclasses <-> command-line flags, seeds, autocast dtype."""
import argparse
import ast
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, get_args, get_type_hints

import numpy as np
import torch

from .data import DATA_FORMATS

__all__ = ['AMP_MODES', 'amp_dtype', 'derived_seed', 'add_model_kwargs_argument', 'add_config_arguments',
           'config_from_args', 'config_command', 'COMMON_HELP', 'CHOICES']


_AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}
AMP_MODES = ('auto', *_AMP_DTYPES)


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` (``auto``: bf16 on CUDA, none on the CPU)."""
    if amp == 'auto':
        return torch.bfloat16 if device.type == 'cuda' else None
    if amp not in _AMP_DTYPES:
        raise ValueError(f'amp must be one of {", ".join(AMP_MODES)}, got {amp!r}')
    return _AMP_DTYPES[amp]


def derived_seed(seed: int, rank: int, purpose: int) -> int:
    """An independent 32-bit seed per (run seed, rank, purpose)."""
    return int(np.random.SeedSequence([seed, rank, purpose]).generate_state(1)[0])


def _model_kwarg(pair: str) -> Tuple[str, Any]:
    """``'depths=(2,2,2,2)'`` -> ``('depths', (2, 2, 2, 2))`` (a value that is not a Python literal stays a string)."""
    key, sep, value = pair.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'{pair!r} is not KEY=VALUE')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


class _ModelKwargs(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


def add_model_kwargs_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--model-kwargs KEY=VALUE ...`` (the same syntax in every command), parsed into a dict (default ``{}``)."""
    parser.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', type=_model_kwarg, action=_ModelKwargs,
                        default={}, help=help)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls, help_text: Dict[str, str],
                         choices: Optional[Dict[str, Sequence[str]]] = None) -> None:
    """One ``--flag`` per dataclass field of ``config_cls`` (bools as ``--flag/--no-flag``), its own fields before
    those it inherits (the ``RunConfig`` ones); ``choices`` restricts a field to the values listed."""
    defaults, hints, choices = config_cls(), get_type_hints(config_cls), {**CHOICES, **(choices or {})}
    inherited = {f.name for base in config_cls.__mro__[1:] if is_dataclass(base) for f in fields(base)}
    for f in sorted(fields(config_cls), key=lambda f: f.name in inherited):
        flag, default = '--' + f.name.replace('_', '-'), getattr(defaults, f.name)
        doc = help_text[f.name]
        if f.name == 'model_kwargs':
            add_model_kwargs_argument(parser, doc)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=doc)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=type(default[0]), nargs=len(default), default=default, help=doc)
        else:
            kind = hints[f.name]
            kind = next((a for a in get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
            parser.add_argument(flag, type=kind, default=default, choices=choices.get(f.name), help=doc)


def config_from_args(config_cls, args: argparse.Namespace):
    """The ``config_cls`` instance for flags parsed by :func:`add_config_arguments`."""
    values = {f.name: getattr(args, f.name) for f in fields(config_cls)}
    values.update({k: tuple(v) for k, v in values.items() if isinstance(v, list)})
    values['model_kwargs'] = dict(values['model_kwargs'])
    return config_cls(**values)


COMMON_HELP = {
    'model': 'green model name registered in timm (greenmim models lists them)',
    'model_kwargs': 'extra timm model kwargs, e.g. window_size=14 "depths=(2,2,18,2)"',
    'input_size': 'image side in pixels: a multiple of 32 whose stage grids (/4, /8, /16, /32) hold whole '
                  'windows (see docs/training.md, "Small images")',
    'data_format': 'how to read --data (auto: from the path)',
    'split': 'split of a Hugging Face dataset or Parquet data',
    'image_column': 'image column of a Hugging Face dataset (default: found automatically)',
    'epoch_size': 'images per epoch: a streamed dataset\'s size when it does not state one; otherwise a random '
                  'subset of that many images (drawn once from --seed) trains instead of all',
    'min_image_size': 'images with a smaller side are skipped (and counted)',
    'num_workers': 'DataLoader worker processes',
    'epochs': 'epochs of the lr schedule',
    'warmup_epochs': 'linear lr warmup, in epochs (may be fractional); one not shorter than --epochs becomes a '
                     'tenth of the run, with a warning',
    'batch_size': 'images per device and micro-batch',
    'accum_iter': 'micro-batches per optimizer step',
    'lr': 'absolute learning rate; overrides --blr',
    'min_lr': 'learning rate at the end of the cosine schedule',
    'weight_decay': 'AdamW weight decay (not on norms, biases and position tables)',
    'betas': 'AdamW betas (two numbers in [0, 1))',
    'clip_grad': 'gradient norm clipping (unset: none)',
    'drop_path': 'stochastic depth rate of the encoder',
    'output_dir': 'run folder: config.json, log.jsonl, checkpoints/',
    'save_every': 'epochs between checkpoints (the last epoch, Ctrl-C and --max-steps always save)',
    'amp': 'autocast: auto (bf16 on CUDA, none on the CPU), bf16, fp16 (with a gradient scaler) or none',
    'device': 'auto (CUDA if available, else the CPU), cpu, cuda or cuda:N',
    'seed': 'seed of the data order, augmentations and masks',
    'resume': 'checkpoint folder, run folder or its checkpoints/ folder to continue exactly',
    'max_steps': 'stop after this many optimizer steps in total, with a checkpoint, an evaluation and a '
                 'reconstruction PNG (the schedule is that of --epochs)',
    'compile': 'torch.compile the model step as one graph of static shapes, compiled once (pre-training: static '
               'layouts built in the loader workers)',
    'cuda_graphs': 'with --compile on CUDA: replay the compiled step as CUDA graphs (mode reduce-overhead)',
    'keep_last': 'checkpoints kept (the best one is never deleted)',
    'log_every': 'optimizer steps between step records in log.jsonl',
    'overwrite': 'replace the run already in --output-dir (refused otherwise)',
}
CHOICES = {'amp': AMP_MODES, 'data_format': DATA_FORMATS}  # fields of both commands with a fixed set of values


def config_command(config_cls, train: Callable, help_text: Dict[str, str],
                   choices: Optional[Dict[str, Sequence[str]]] = None) -> Tuple[Callable, Callable]:
    """``(add_arguments, run)`` of the ``greenmim`` subcommand that runs ``train(config_cls(...))``, one flag per
    config field (help from :data:`COMMON_HELP` and ``help_text``, allowed values from :data:`CHOICES` and
    ``choices``)."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, config_cls, {**COMMON_HELP, **help_text}, choices)

    def run(args: argparse.Namespace) -> int:
        train(config_from_args(config_cls, args))
        return 0

    return add_arguments, run
