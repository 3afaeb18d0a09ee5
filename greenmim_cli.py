"""The ``greenmim`` command: ``greenmim <command> [options]`` (``greenmim --help`` lists the commands).

A top-level module rather than part of the ``greenmim`` package, because ``import greenmim`` registers the models in
timm (and so imports torch): ``greenmim --help`` and ``greenmim --version`` answer without importing either
(``greenmim.cli`` is this module under the package's name).

Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``, imported only when that
subcommand is used (or its help is built), so a broken optional module affects its own subcommand only. Every flag's
help shows its default.

Errors are one line on stderr, ``greenmim <command>: error: ...``, never a traceback for a foreseen problem: exit
status 2 for a usage error, bad settings or unusable input (nothing was changed), 1 for a failure while running (a
non-finite loss, a full disk: the last checkpoint is intact).
"""
import argparse
import importlib
import sys
from importlib.metadata import version
from typing import Optional, Sequence

__all__ = ['COMMANDS', 'SUMMARIES', 'main']

COMMANDS = {
    'pretrain': 'greenmim.train.pretrain',
    'finetune': 'greenmim.train.finetune',
    'export': 'greenmim.train.export',
    'models': 'greenmim.models.listing',
    'publish': 'greenmim.hub.publish',
    'convert': 'greenmim.hub.convert',
}
SUMMARIES = {
    'pretrain': 'masked-image-modeling pre-training of a green model (GreenMIM, or the dense SimMIM baseline)',
    'finetune': 'fine-tune (or linear-probe) a pre-trained encoder as a timm classifier',
    'export': "a checkpoint's encoder (and MIM decoder) as timm weights",
    'models': 'the green models: tags, image size and whether their weights are published',
    'publish': 'build (and upload) the Hub repository of one model.tag release',
    'convert': "convert the authors' GreenMIM / SimMIM checkpoints to this package's layout",
}


class _OneLineErrors(argparse.ArgumentParser):
    """A subcommand's parser whose usage errors are one line (the full usage of a training command is long)."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _one_line(error: Exception) -> str:
    return ' '.join(line.strip() for line in str(error).splitlines() if line.strip())


def _top_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = '\n'.join(f'  {name:<{width}}  {SUMMARIES[name]}' for name in COMMANDS)
    parser = argparse.ArgumentParser(
        prog='greenmim', formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f'GreenMIM pre-training, fine-tuning and tools.\n\ncommands:\n{listing}',
        epilog='greenmim COMMAND --help lists the options of a command, with their defaults.')
    parser.add_argument('command', choices=list(COMMANDS), metavar='COMMAND', help='one of the commands above')
    parser.add_argument('--version', action='version', version=f'greenmim {version("greenmim")}')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1])  # prints the help, the version, or the error of a missing/unknown command
        return 2
    command = argv[0]
    try:
        module = importlib.import_module(COMMANDS[command])
    except ImportError as e:
        print(f'greenmim {command}: unavailable ({e})', file=sys.stderr)
        return 1
    sub = _OneLineErrors(prog=f'greenmim {command}', description=SUMMARIES[command],
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad settings or input files: nothing was changed
        print(f'greenmim {command}: error: {_one_line(e)}', file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as e:  # a non-finite loss, a full disk: the last checkpoint is intact
        print(f'greenmim {command}: error: {_one_line(e)}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'greenmim {command}: aborted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
