"""Independent dense computation of Swin stage outputs with masked keys, for checking forward_visible.

Runs timm's own dense modules (patch embedding, patch merging, window partitioning, WindowAttention) on the full
token grid; each window attention gets Swin's shift mask plus a mask on the keys of masked tokens. Visible tokens
then never see masked ones, so their outputs are what forward_visible must produce.
"""
import torch
from timm.models.swin_transformer import window_partition, window_reverse

KEY_MASK = -1e9


def _dense_block(block, x, visible):
    b, h, w, c = x.shape
    (sh, sw), (wh, ww) = block.shift_size, block.window_size
    y = torch.roll(block.norm1(x), (-sh, -sw), (1, 2))
    vis = torch.roll(visible, (-sh, -sw), (0, 1))
    windows = window_partition(y, (wh, ww)).reshape(-1, wh * ww, c)
    vis_windows = window_partition(vis[None, :, :, None].to(x.dtype), (wh, ww)).reshape(-1, wh * ww)
    mask = ((1 - vis_windows) * KEY_MASK)[:, None, :].expand(-1, wh * ww, -1)
    if block.attn_mask is not None:
        mask = mask + block.attn_mask.to(x.dtype)
    out = block.attn(windows, mask=mask)
    y = torch.roll(window_reverse(out.reshape(-1, wh, ww, c), (wh, ww), h, w), (sh, sw), (1, 2))
    x = x + y
    return x + block.mlp(block.norm2(x))


def dense_key_masked_stages(model, images, mask):
    """Stage outputs ``[B, N_s, C_s]`` at the visible tokens (raster order), computed densely."""
    x = model.patch_embed(images)
    outputs = []
    for stage in model.layers:
        x = stage.downsample(x)
        f = x.shape[1] // mask.shape[0]
        visible = mask.repeat_interleave(f, 0).repeat_interleave(f, 1)
        for block in stage.blocks:
            x = _dense_block(block, x, visible)
        outputs.append(x[:, visible])
    return outputs
