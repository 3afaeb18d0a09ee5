"""The ``greenmim`` command: ``greenmim <pretrain|finetune|export|publish|convert> [options]``.

Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``, imported only when that
subcommand is used (or its help is built), so a broken optional module affects its own subcommand only.

Errors are one line on stderr, ``greenmim <command>: error: ...``, never a traceback for a foreseen problem: exit
status 2 for a usage error, bad settings or unusable input (nothing was changed), 1 for a failure while running (a
non-finite loss, a full disk: the last checkpoint is intact).
"""
import argparse
import importlib
import sys
from typing import Optional, Sequence

__all__ = ['COMMANDS', 'main']

COMMANDS = {
    'pretrain': 'greenmim.train.pretrain',
    'finetune': 'greenmim.train.finetune',
    'export': 'greenmim.train.export',
    'publish': 'greenmim.hub.publish',
    'convert': 'greenmim.hub.convert',
}


def _summary(module) -> str:
    return (module.__doc__ or '').strip().splitlines()[0].replace('``', '') if module.__doc__ else ''


class _OneLineErrors(argparse.ArgumentParser):
    """A subcommand's parser whose usage errors are one line (the full usage of a training command is long)."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _one_line(error: Exception) -> str:
    return ' '.join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog='greenmim', description='GreenMIM pre-training, fine-tuning and tools.')
    parser.add_argument('command', choices=sorted(COMMANDS), help='subcommand (greenmim COMMAND --help for its options)')
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints usage / the error for a missing or unknown command
        return 2
    command = argv[0]
    try:
        module = importlib.import_module(COMMANDS[command])
    except ImportError as e:
        print(f'greenmim {command}: unavailable ({e})', file=sys.stderr)
        return 1
    sub = _OneLineErrors(prog=f'greenmim {command}', description=_summary(module))
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
