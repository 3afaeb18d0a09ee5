"""Build the Hub repository of one ``model.tag`` release and upload it.

The folder holds ``model.safetensors`` and ``config.json`` in timm's format (written by timm's ``save_for_hf``),
``README.md`` (the model card) and, for ``.mim_*`` tags, ``mim_decoder.safetensors`` (the MIM decoder and mask
token, to continue pre-training). ``--dry-run`` writes the folder only; otherwise it is uploaded with
``huggingface_hub`` using the token in ``HF_TOKEN``. The last line printed is the release's manifest entry (JSON,
with the sha256 of the files); ``--manifest`` writes it into a manifest after a successful upload.

    python -m greenmim.hub.publish run/checkpoint.pth --model green_swin_base --tag mim_in1k --out build/hub
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

import timm
from huggingface_hub import HfApi
from timm.models import save_for_hf

from greenmim.checkpoint import (
    DECODER_FILE, WEIGHTS_FILE, follow_umask, is_mim_state_dict, read_checkpoint, save_weights, sha256_file,
    split_mim_state_dict, verify_state_dict, weights_metadata)

from greenmim.train.config import add_model_kwargs_argument
from greenmim.train.validation import check_model_name

from .card import render_model_card
from .convert import build_target, detect_kind
from greenmim.models.manifest import Metric, Release, load_manifest, write_release

__all__ = ['build_repo_folder', 'add_arguments', 'run']


def _release(args: argparse.Namespace) -> Release:
    """The manifest's entry for ``model.tag`` (or a new one), with this publication's source, metrics and model
    kwargs (those given, else the entry's)."""
    name = f'{args.model}.{args.tag}'
    release = load_manifest().get(name)
    if release is None and not args.repo_id:
        raise ValueError(f'{name} is not in the manifest: give --repo-id (a full "org/name" hub id)')
    try:
        metrics = tuple(Metric(**m) for m in json.loads(args.metrics.read_text())) if args.metrics else ()
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f'--metrics {args.metrics}: expected a JSON list of {{"name", "value", "dataset", '
                         f'"command"}}: {e}') from e
    base = release or Release(args.model, args.tag, args.repo_id, 'not-published', args.license or 'apache-2.0')
    return dataclasses.replace(
        base, hub_id=args.repo_id or base.hub_id, license=args.license or base.license,
        source_checkpoint=args.source_checkpoint or str(args.checkpoint), metrics=metrics or base.metrics,
        notes=args.notes if args.notes is not None else base.notes, model_kwargs=args.model_kwargs or base.model_kwargs)


def build_repo_folder(
        checkpoint: Path,
        release: Release,
        out: Path,
        model_kwargs: Optional[dict] = None,
        decoder_heads: int = 16,
        status: str = 'not-published',
        decoder_checkpoint: Optional[Path] = None,
) -> Release:
    """Write the repository folder of ``release`` from ``checkpoint`` into ``out`` (created, must be empty).

    A ``.mim_*`` release takes a full GreenMIM/SimMIM state dict (``encoder.*`` and decoder keys, e.g. a training
    checkpoint or the output of :mod:`greenmim.hub.convert`), or the encoder in timm's layout plus
    ``decoder_checkpoint`` (as ``greenmim export`` writes them); a fine-tuned release takes a classifier state dict.
    Both are verified key by key against the model built from ``release.model`` and ``model_kwargs``.

    Returns:
        ``release`` with ``status`` (``published`` when the folder is about to be uploaded; the card says so) and
        the sha256 of the written weights (and decoder).
    """
    model_kwargs = model_kwargs or {}
    if out.exists() and any(out.iterdir()):
        raise ValueError(f'output folder {out} is not empty')
    state_dict = read_checkpoint(checkpoint)[0]
    if decoder_checkpoint is not None:
        state_dict = {f'encoder.{k}': v for k, v in state_dict.items()} | read_checkpoint(decoder_checkpoint)[0]
    has_encoder = is_mim_state_dict(state_dict)
    if release.is_mim != has_encoder:
        raise ValueError(
            f'{release.name} needs a {"MIM (encoder.* + decoder)" if release.is_mim else "classifier"} checkpoint, '
            f'{checkpoint} is {"a MIM" if has_encoder else "an encoder/classifier"} checkpoint')
    model = timm.create_model(release.name, **model_kwargs)
    decoder, decoder_meta = {}, {}
    if release.is_mim:
        kind = detect_kind(state_dict)
        mim = build_target(kind, release.model, state_dict, decoder_heads, **model_kwargs)
        verify_state_dict(state_dict, mim.state_dict(), f'{type(mim).__name__} around {release.model}', checkpoint)
        state_dict, decoder = split_mim_state_dict(state_dict)
        decoder_meta = weights_metadata('decoder', release.model, model_kwargs, wrapper=mim)
    verify_state_dict(state_dict, model.state_dict(), f'{release.name} ({type(model).__name__})', checkpoint)
    model.load_state_dict(state_dict)

    out.mkdir(parents=True, exist_ok=True)
    notes = tuple(f'{step}: {how}' for step, how in release.recipe.items())
    save_for_hf(model, out, safe_serialization=True, model_config={
        'pretrained_cfg': {'license': release.license, 'notes': notes}})
    follow_umask(out / WEIGHTS_FILE)
    files = {'sha256': sha256_file(out / WEIGHTS_FILE)}
    if decoder:
        save_weights(decoder, out / DECODER_FILE, decoder_meta)
        files['decoder_sha256'] = sha256_file(out / DECODER_FILE)
    release = dataclasses.replace(release, status=status, **files)
    (out / 'README.md').write_text(render_model_card(release, model, DECODER_FILE if decoder else None))
    return release


def _token() -> str:
    token = os.environ.get('HF_TOKEN')
    if not token:
        raise ValueError('set HF_TOKEN to a Hub token with write access to upload (or use --dry-run)')
    return token


def upload(folder: Path, release: Release, private: bool = False, revision: Optional[str] = None) -> str:
    """Create ``release.hub_id`` if needed and upload ``folder``; the token comes from ``HF_TOKEN``."""
    api = HfApi(token=_token(), library_name='greenmim')
    api.create_repo(release.hub_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=release.hub_id, folder_path=folder, revision=revision,
                               commit_message=f'Add {release.name} weights')
    return commit.commit_url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', type=Path, help='weights to publish (.safetensors / .pth)')
    parser.add_argument('--decoder', type=Path,
                        help='MIM decoder file, when the checkpoint is the encoder alone (greenmim export output)')
    parser.add_argument('--model', required=True, help='e.g. green_swin_base')
    parser.add_argument('--tag', required=True, help='e.g. mim_in1k or mim_in1k_ft_in1k')
    parser.add_argument('--out', type=Path, required=True, help='repository folder to write (empty or new)')
    add_model_kwargs_argument(parser, 'extra timm kwargs, e.g. window_size=14 (none: the manifest entry\'s)')
    parser.add_argument('--repo-id', help='full hub id (default: the manifest entry\'s)')
    parser.add_argument('--license', help='licence id (default: the manifest entry\'s)')
    parser.add_argument('--source-checkpoint', help='what the weights came from, for the manifest (default: path)')
    parser.add_argument('--metrics', type=Path,
                        help='JSON list of {"name", "value", "dataset", "command"} measured on these weights')
    parser.add_argument('--notes', help='notes for the manifest entry')
    parser.add_argument('--decoder-heads', type=int, default=16, help='GreenMIM decoder heads (not in the weights)')
    parser.add_argument('--dry-run', action='store_true', help='write the folder only, upload nothing')
    parser.add_argument('--private', action='store_true', help='create the Hub repository private')
    parser.add_argument('--revision', help='branch to upload to (default: main)')
    parser.add_argument('--manifest', type=Path, help='manifest to record the release in after the upload')


def run(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    if not args.dry_run:
        _token()  # fail before building anything
    release = _release(args)
    release = build_repo_folder(
        args.checkpoint, release, args.out, release.model_kwargs, args.decoder_heads,
        status='not-published' if args.dry_run else 'published', decoder_checkpoint=args.decoder)
    print(f'wrote {args.out}: {", ".join(sorted(p.name for p in args.out.iterdir()))}')
    if not args.dry_run:
        print(f'uploaded: {upload(args.out, release, args.private, args.revision)}')
        if args.manifest:
            write_release(release, args.manifest)
    print(json.dumps(release.to_dict()))
    return 0


if __name__ == '__main__':  # python -m greenmim.hub.publish is `greenmim publish`
    from greenmim.cli import main
    sys.exit(main(['publish', *sys.argv[1:]]))
