"""The ``greenmim`` command under the package's name: :mod:`greenmim_cli` (a top-level module, so that
``greenmim --help`` imports neither torch nor timm)."""
import sys

from greenmim_cli import COMMANDS, SUMMARIES, main

__all__ = ['COMMANDS', 'SUMMARIES', 'main']

if __name__ == '__main__':
    sys.exit(main())
