"""The project's kernels at Swin-B / Twins-L stage-1 shapes, each launched a few times, for Nsight Compute.

    ncu --csv --page raw --metrics "$(python benchmarks/ncu_summary.py --metrics)" \
        --kernel-name regex:"_group_attention|_sparse_conv" --log-file ncu.csv python benchmarks/ncu_kernels.py
    python benchmarks/ncu_summary.py ncu.csv --out ncu_summary.md

The three grouped-attention kernels at Swin-B stage 1 (forward and dk/dv backward at window 7; window 14 makes groups
above one tile, so the dq kernel runs too), plain and shifted windows, on static layouts of a random 75% mask at batch
128, bf16, head_dim 32; and the sparse depthwise convolution (forward and backward) at Twins-L stage 1 (128 channels,
batch 128): 12 launches.
"""
import argparse

import timm
import torch

import greenmim  # noqa: F401  (registers the models)
from greenmim.kernels import group_window_attention_triton, neighbour_map, sparse_depthwise_conv_triton
from greenmim.masking import random_mask


def attention(batch: int, window: int, heads: int = 4, head_dim: int = 32) -> None:
    encoder = timm.create_model('green_swin_base', window_size=window, device='meta')
    mask = random_mask(encoder.mask_grid_size, 0.75, torch.Generator().manual_seed(0))
    stage = encoder.visible_layout(mask, batch, torch.device('cuda'), static=True)[0]
    tokens = batch * stage.num_tokens
    for groups in stage.attention.values():
        qkv = torch.randn(tokens, 3, heads, head_dim, device='cuda', dtype=torch.bfloat16, requires_grad=True)
        table = torch.randn((2 * window - 1) ** 2, heads, device='cuda', requires_grad=True)
        group_window_attention_triton(qkv, groups, table, head_dim ** -0.5).sum().backward()


def sparse_conv(batch: int, channels: int = 128, grid: int = 56) -> None:
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0), batch_size=batch)
    visible = mask.repeat_interleave(grid // 7, 1).repeat_interleave(grid // 7, 2).flatten(1)
    token_index = visible.nonzero()[:, 1].view(batch, -1).cuda()
    neighbours = neighbour_map(token_index, (grid, grid), (3, 3), batch)
    x = torch.randn(neighbours.shape[0], channels, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(channels, 1, 3, 3, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    sparse_depthwise_conv_triton(x, neighbours, weight, None).sum().backward()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=128)
    args = parser.parse_args(argv)
    for window in (7, 14):
        attention(args.batch_size, window)
    sparse_conv(args.batch_size)
    torch.cuda.synchronize()


if __name__ == '__main__':
    main()
