"""Two-process DDP pre-training on gloo: ranks draw different masks and end with identical weights."""
import socket

import torch
import torch.multiprocessing as mp

from train_fixtures import copy_photos, ddp_worker, tiny_pretrain_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_uses_different_masks_per_rank(tmp_path):
    photos = copy_photos(tmp_path / 'photos', 16)  # 8 per rank: 2 steps of batch 4
    config = tiny_pretrain_config(tmp_path / 'run', data=str(photos), epochs=1, vis_every=1)
    mp.spawn(ddp_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    assert len(ranks[0]['masks']) == 3 and len(ranks[1]['masks']) == 2  # rank 0 also drew the preview mask
    masks = [torch.stack(r['masks'][-2:]) for r in ranks]  # one mask per micro-batch per rank
    assert not torch.equal(masks[0], masks[1])
    assert ranks[0]['losses'] == ranks[1]['losses'] and len(ranks[0]['losses']) == 2  # losses are rank means
    for name, value in ranks[0]['weights'].items():  # gradients were all-reduced
        assert torch.equal(value, ranks[1]['weights'][name]), name
    assert (tmp_path / 'run' / 'checkpoints' / 'step-00000002' / 'model.safetensors').is_file()
    assert (tmp_path / 'run' / 'reconstructions' / 'epoch-0001.png').is_file()
