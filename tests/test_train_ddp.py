"""Two-process DDP pre-training on gloo: ranks draw different masks and end with identical weights."""
import json
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from train_fixtures import copy_photos, ddp_worker, tiny_pretrain_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _spawn_two_ranks(config, out_dir, timeout_s: float = 300) -> None:
    """Run :func:`ddp_worker` on 2 ranks; fail (instead of hanging) if they do not finish in ``timeout_s``."""
    context = mp.spawn(ddp_worker, args=(2, _free_port(), config, str(out_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f'DDP run did not finish in {timeout_s} s (ranks out of step?)')


def test_two_process_gloo_run_uses_different_masks_per_rank(tmp_path):
    photos = copy_photos(tmp_path / 'photos', 16)  # 8 per rank: 2 steps of batch 4
    config = tiny_pretrain_config(tmp_path / 'run', data=str(photos), epochs=1, vis_every=1)
    _spawn_two_ranks(config, tmp_path)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    assert len(ranks[0]['masks']) == len(ranks[1]['masks']) == 2
    masks = [torch.stack(r['masks']) for r in ranks]  # one mask per micro-batch per rank, drawn by the loader
    assert not torch.equal(masks[0], masks[1])
    assert ranks[0]['losses'] == ranks[1]['losses'] and len(ranks[0]['losses']) == 2  # losses are rank means
    for name, value in ranks[0]['weights'].items():  # gradients were all-reduced
        assert torch.equal(value, ranks[1]['weights'][name]), name
    assert (tmp_path / 'run' / 'checkpoints' / 'step-00000002' / 'model.safetensors').is_file()
    assert (tmp_path / 'run' / 'reconstructions' / 'epoch-0001.png').is_file()


def test_micro_batch_unreadable_on_one_rank_is_skipped_by_all_ranks(tmp_path):
    """With batch 1 and half the files corrupt, some micro-batches are empty on one rank only: every rank must skip
    them together (a lone skip would leave the other rank waiting in DDP's gradient all-reduce). With accumulation
    over 2 micro-batches, a skipped last micro-batch of a step is the one whose backward DDP syncs in: the
    gradients of the step must still be averaged, or the ranks' weights drift apart."""
    photos = copy_photos(tmp_path / 'photos', 6)
    for i in range(6):
        (photos / f'corrupt{i}.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
    config = tiny_pretrain_config(tmp_path / 'run', data=str(photos), batch_size=1, accum_iter=2, epochs=1)
    _spawn_two_ranks(config, tmp_path)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    for name, value in ranks[0]['weights'].items():
        assert torch.equal(value, ranks[1]['weights'][name]), name
    records = [json.loads(line) for line in (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()]
    assert [r['images_skipped'] for r in records if r['type'] == 'epoch'] == [6]  # counted over both ranks
