"""Independent dense computations of stage outputs with masked keys, for checking forward_visible.

Swin: timm's own dense modules (patch embedding, patch merging, window partitioning, WindowAttention) on the full
token grid; each window attention gets Swin's shift mask plus a mask on the keys of masked tokens.

SwinV2: the same with timm's V2 modules (its PatchMerging, its WindowAttention with cosine attention and the
continuous position bias, the res-post-norm residuals ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``).

Twins: timm's modules (patch embeddings, the q/kv/qkv/proj linears, the sub-sampling conv and its norm, PosConv
with its residual, MLPs) on the full token grid; masked tokens are zeroed before each PosConv, and every attention
(windows of the full grid; global attention over all sub-sampled cells) gets a mask on the keys of masked tokens
(a sub-sampled cell is a key only if all its tokens are visible).

Visible tokens then never see masked ones, so their outputs are what forward_visible must produce.
"""
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import window_partition, window_reverse
from timm.models.twins import LocallyGroupedAttn

KEY_MASK = -1e9


def rel_err(a, b):
    """``|a - b| / |b|`` (Frobenius norms)."""
    return ((a - b).norm() / b.norm()).item()


def assert_stages_close(ours, dense, tol=1e-5):
    """Per-stage outputs ``[B, N_s, C_s]`` of the same shapes, each within relative error ``tol`` of ``dense``."""
    assert [t.shape for t in ours] == [t.shape for t in dense]
    for o, d in zip(ours, dense):
        assert rel_err(o, d) < tol


def _dense_window_attention(block, y, visible):
    """``block.attn`` over the (shifted) windows of ``y [B, H, W, C]``, Swin's shift mask plus masked keys."""
    b, h, w, c = y.shape
    (sh, sw), (wh, ww) = block.shift_size, block.window_size
    y = torch.roll(y, (-sh, -sw), (1, 2))
    vis = torch.roll(visible, (-sh, -sw), (0, 1))
    windows = window_partition(y, (wh, ww)).reshape(-1, wh * ww, c)
    vis_windows = window_partition(vis[None, :, :, None].to(y.dtype), (wh, ww)).reshape(-1, wh * ww)
    mask = ((1 - vis_windows) * KEY_MASK)[:, None, :].expand(-1, wh * ww, -1)
    if block.attn_mask is not None:
        mask = mask + block.attn_mask.to(y.dtype)
    out = block.attn(windows, mask=mask)
    return torch.roll(window_reverse(out.reshape(-1, wh, ww, c), (wh, ww), h, w), (sh, sw), (1, 2))


def _dense_block(block, x, visible):
    x = x + _dense_window_attention(block, block.norm1(x), visible)
    return x + block.mlp(block.norm2(x))


def _dense_v2_block(block, x, visible):
    x = x + block.norm1(_dense_window_attention(block, x, visible))
    return x + block.norm2(block.mlp(x))


def _dense_swin_stages(model, images, mask, block_fn):
    x = model.patch_embed(images)
    outputs = []
    for stage in model.layers:
        x = stage.downsample(x)
        f = x.shape[1] // mask.shape[0]
        visible = mask.repeat_interleave(f, 0).repeat_interleave(f, 1)
        for block in stage.blocks:
            x = block_fn(block, x, visible)
        outputs.append(x[:, visible])
    return outputs


def dense_key_masked_stages(model, images, mask):
    """Stage outputs ``[B, N_s, C_s]`` at the visible tokens (raster order), computed densely."""
    return _dense_swin_stages(model, images, mask, _dense_block)


def dense_swinv2_key_masked_stages(model, images, mask):
    """SwinV2 stage outputs ``[B, N_s, C_s]`` at the visible tokens (raster order), computed densely."""
    return _dense_swin_stages(model, images, mask, _dense_v2_block)


def _key_mask(key_visible, dtype):
    """Additive attention mask ``[..., Nk]``: 0 for visible keys, ``KEY_MASK`` for masked ones."""
    return (~key_visible).to(dtype) * KEY_MASK


def _dense_local_attention(attn, x, size, visible):
    """Twins ``LocallyGroupedAttn`` on the full grid ``x [B, H*W, C]``, masked keys excluded in every window."""
    b, n, c = x.shape
    (h, w), ws, heads = size, attn.ws, attn.num_heads
    windows = x.view(b, h // ws, ws, w // ws, ws, c).transpose(2, 3).reshape(b, -1, ws * ws, c)
    vis = visible.view(h // ws, ws, w // ws, ws).transpose(1, 2).reshape(-1, ws * ws)
    q, k, v = attn.qkv(windows).view(b, -1, ws * ws, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(vis, x.dtype)[None, :, None, None, :])
    out = out.transpose(2, 3).reshape(b, h // ws, w // ws, ws, ws, c).transpose(2, 3).reshape(b, n, c)
    return attn.proj(out)


def _dense_global_attention(attn, x, size, visible):
    """Twins ``GlobalSubSampleAttn`` on the full grid: keys and values of every (sub-sampled) cell, the cells with
    a masked token excluded."""
    b, n, c = x.shape
    heads = attn.num_heads
    q = attn.q(x).view(b, n, heads, -1).transpose(1, 2)
    key_visible = visible.flatten()
    if attn.sr is not None:
        r = attn.sr_ratio
        x = attn.norm(attn.sr(x.transpose(1, 2).reshape(b, c, *size)).flatten(2).transpose(1, 2))
        key_visible = visible.view(size[0] // r, r, size[1] // r, r).all(3).all(1).flatten()
    k, v = attn.kv(x).view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(key_visible, x.dtype)[None])
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


def dense_twins_key_masked_stages(model, images, mask):
    """Twins stage outputs ``[B, N_s, C_s]`` at the visible tokens (raster order), computed densely."""
    x = images
    outputs = []
    for embed, blocks, pos_block in zip(model.patch_embeds, model.blocks, model.pos_block):
        x, size = embed(x)
        visible = mask.repeat_interleave(size[0] // mask.shape[0], 0).repeat_interleave(size[1] // mask.shape[1], 1)
        for j, block in enumerate(blocks):
            attention = (_dense_local_attention if isinstance(block.attn, LocallyGroupedAttn)
                         else _dense_global_attention)
            x = x + attention(block.attn, block.norm1(x), size, visible)
            x = x + block.mlp(block.norm2(x))
            if j == 0:
                x = pos_block(x * visible.flatten()[None, :, None], size)
        outputs.append(x[:, visible.flatten()])
        x = x.transpose(1, 2).reshape(x.shape[0], -1, *size)
    return outputs
