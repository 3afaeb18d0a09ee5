"""A run's output folder: never taken over by another run unless asked, and locked while a run writes it.

A folder holds a run when it has any of :data:`RUN_ENTRIES`. A new run refuses such a folder unless it resumes a
checkpoint inside it (``--resume``) or is told to replace it (``--overwrite``, which deletes those entries and
nothing else). While a run writes the folder it holds an exclusive ``flock`` on ``<folder>/.greenmim.lock`` (the
file records the holder's pid): a second run in the same folder is refused at once. The lock goes with the run,
also when the process is killed, so it never goes stale.
"""
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

__all__ = ['RUN_ENTRIES', 'LOCK_FILE', 'run_entries', 'claim_run_folder']

RUN_ENTRIES = ('checkpoints', 'config.json', 'log.jsonl', 'reconstructions')
LOCK_FILE = '.greenmim.lock'


def run_entries(folder: Path) -> List[str]:
    """The entries of a run that ``folder`` holds."""
    return [name for name in RUN_ENTRIES if (folder / name).exists()]


def _resumes_inside(resume: Optional[str], folder: Path) -> bool:
    return resume is not None and Path(resume).resolve().is_relative_to(folder.resolve())


def _check_free(folder: Path, resume: Optional[str], overwrite: bool) -> None:
    """Raise ``ValueError`` if a run in ``folder`` would overwrite a run it was not told to replace."""
    if _resumes_inside(resume, folder):
        if overwrite:
            raise ValueError(f'--overwrite would delete the checkpoint that --resume {resume} reads: pass one of them')
        return
    existing = run_entries(folder)
    if existing and not overwrite:
        raise ValueError(f'output folder {folder} already holds a run ({", ".join(existing)}): pass --resume {folder} '
                         'to continue it, --overwrite to replace it, or another --output-dir')


@contextmanager
def claim_run_folder(output_dir, resume: Optional[str] = None, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``output_dir`` (created if needed) for one run; with ``overwrite``, a run already in it is deleted first.

    Raises:
        ValueError: the folder holds another run (see the module docstring), or another process's run holds its
            lock. Nothing in the folder is changed then.
    """
    folder = Path(output_dir)
    _check_free(folder, resume, overwrite)  # before creating anything in a folder that is refused
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, 'a+') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ValueError(f'output folder {folder} is in use by another greenmim run (pid {lock.read().strip() or "?"}'
                             '): wait for it to end, or pass another --output-dir') from None
        lock.truncate(0)
        lock.write(f'{os.getpid()}\n')
        lock.flush()
        _check_free(folder, resume, overwrite)  # a run may have ended in the folder since the first check
        if overwrite and not _resumes_inside(resume, folder):
            for name in run_entries(folder):
                entry = folder / name
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        yield folder
