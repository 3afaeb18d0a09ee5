"""``greenmim convert`` of SimMIM's SwinV2 checkpoints (microsoft/Swin-Transformer ``SwinTransformerV2ForSimMIM``
inside ``SimMIM``, as its pre-training and data-scaling releases save them) and of SwinV2 classifiers fine-tuned with
that code. The fixtures are built key by key from the published layout (models/swin_transformer_v2.py and
models/simmim.py there), not from this package's state dicts."""
import math

import pytest
import safetensors
import torch

import greenmim
from greenmim.cli import main
from greenmim.hub import convert

MODEL = 'green_swinv2_base_window12_192'  # SimMIM's SwinV2 pre-training: 192 px, window 12
ARCH = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))  # narrow; windows 12/12/12/6 at 192 px
IMG, WINDOW, PATCH = 192, 12, 4


def coords_table(window: int, pretrained: int = 0) -> torch.Tensor:
    """``[1, 2w-1, 2w-1, 2]``: SwinV2's log-spaced relative coordinates, from the paper's definition: offsets over
    ``pretrained - 1`` (or ``w - 1``), times 8, then ``sign(x) * log2(1 + |x|) / log2(8)``."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing='ij'), -1)[None]
    table = table / ((pretrained or window) - 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1) / math.log2(8)


def microsoft_swinv2(gen, num_classes=0, window=WINDOW, prefix=''):
    """A Microsoft-layout SwinV2 state dict: patch merging at the end of stages 0-2 (``layers.i.downsample``), q and
    v biases, ``logit_scale [H, 1, 1]``, ``cpb_mlp.{0,2}``, the saved buffers ``relative_coords_table``,
    ``relative_position_index`` and (shifted blocks) ``attn_mask``; windows clamped to stage grids no larger."""
    def t(*shape):
        return torch.randn(*shape, generator=gen)

    e = ARCH['embed_dim']
    sd = {'patch_embed.proj.weight': t(e, 3, PATCH, PATCH), 'patch_embed.proj.bias': t(e),
          'patch_embed.norm.weight': t(e), 'patch_embed.norm.bias': t(e)}
    for i, (depth, heads) in enumerate(zip(ARCH['depths'], ARCH['num_heads'])):
        c, res = e * 2 ** i, IMG // PATCH // 2 ** i
        w = min(window, res)
        for j in range(depth):
            b = f'layers.{i}.blocks.{j}.'
            sd.update({
                b + 'norm1.weight': t(c), b + 'norm1.bias': t(c), b + 'norm2.weight': t(c), b + 'norm2.bias': t(c),
                b + 'attn.logit_scale': torch.rand(heads, 1, 1, generator=gen) * 5,
                b + 'attn.cpb_mlp.0.weight': t(512, 2), b + 'attn.cpb_mlp.0.bias': t(512),
                b + 'attn.cpb_mlp.2.weight': t(heads, 512),
                b + 'attn.relative_coords_table': coords_table(w),
                b + 'attn.relative_position_index': torch.randint(0, (2 * w - 1) ** 2, (w * w, w * w), generator=gen),
                b + 'attn.qkv.weight': t(3 * c, c), b + 'attn.q_bias': t(c), b + 'attn.v_bias': t(c),
                b + 'attn.proj.weight': t(c, c), b + 'attn.proj.bias': t(c),
                b + 'mlp.fc1.weight': t(4 * c, c), b + 'mlp.fc1.bias': t(4 * c),
                b + 'mlp.fc2.weight': t(c, 4 * c), b + 'mlp.fc2.bias': t(c)})
            if j % 2 and res > w:
                sd[b + 'attn_mask'] = torch.zeros((res // w) ** 2, w * w, w * w)
        if i < 3:
            sd.update({f'layers.{i}.downsample.reduction.weight': t(2 * c, 4 * c),
                       f'layers.{i}.downsample.norm.weight': t(2 * c), f'layers.{i}.downsample.norm.bias': t(2 * c)})
    final = e * 8
    sd.update({'norm.weight': t(final), 'norm.bias': t(final)})
    if num_classes:
        sd.update({'head.weight': t(num_classes, final), 'head.bias': t(num_classes)})
    return {prefix + k: v for k, v in sd.items()}, final


def microsoft_simmim(gen, window=WINDOW):
    """``SimMIM(encoder=SwinTransformerV2ForSimMIM)``: the encoder under ``encoder.`` with its ``mask_token
    [1, 1, E]``, the 1x1-conv decoder ``decoder.0`` (then a pixel shuffle of stride 32)."""
    sd, final = microsoft_swinv2(gen, window=window, prefix='encoder.')
    sd['encoder.mask_token'] = torch.randn(1, 1, ARCH['embed_dim'], generator=gen)
    sd['decoder.0.weight'] = torch.randn(32 * 32 * 3, final, 1, 1, generator=gen)
    sd['decoder.0.bias'] = torch.randn(32 * 32 * 3, generator=gen)
    return sd


def expected_key(k: str) -> str:
    """Where a Microsoft-layout key lands in this package (written from the two layouts, not from convert)."""
    k = k.replace('encoder.mask_token', 'mask_token').replace('decoder.0.', 'decoder.').replace('head.', 'head.fc.')
    for i in (2, 1, 0):
        k = k.replace(f'layers.{i}.downsample.', f'layers.{i + 1}.downsample.')
    return k


def check_exact(source, converted):
    dropped = ('relative_coords_table', 'relative_position_index', 'attn_mask')  # buffers timm recomputes
    kept = {expected_key(k): v for k, v in source.items() if not k.endswith(dropped)}
    assert converted.keys() == kept.keys()
    for k, v in kept.items():
        assert torch.equal(converted[k], v.reshape(converted[k].shape)), k


def test_simmim_swinv2_checkpoint_converts_exactly(tmp_path):
    source = microsoft_simmim(torch.Generator().manual_seed(0))
    torch.save({'model': source, 'epoch': 799, 'config': 'simmim_pretrain__swinv2_base__img192_window12'},
               tmp_path / 'swinv2_base_1k_500k.pth')
    out = tmp_path / 'converted.safetensors'
    assert main(['convert', str(tmp_path / 'swinv2_base_1k_500k.pth'), str(out), '--model', MODEL,
                 '--model-kwargs', 'embed_dim=16', 'depths=(2,2,2,2)', 'num_heads=(1,2,2,4)']) == 0
    converted = safetensors.torch.load_file(out)
    check_exact(source, converted)
    with safetensors.safe_open(out, 'pt') as f:
        assert f.metadata()['mim_class'] == 'SimMIM'
    sim = greenmim.SimMIM(MODEL, **ARCH)
    sim.load_state_dict(converted)  # strict: every key of greenmim.SimMIM around green_swinv2
    assert sim.mask_token.shape == (1, 1, 1, 16)
    out = sim(torch.randn(1, 3, IMG, IMG), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


def test_swinv2_classifier_fine_tuned_with_simmim_code_converts_exactly():
    source, _ = microsoft_swinv2(torch.Generator().manual_seed(1), num_classes=10)
    converted, target, _ = convert.convert_state_dict(source, MODEL, **ARCH)
    check_exact(source, converted)
    assert target.num_classes == 10


def test_other_window_is_refused_not_moved():
    """SimMIM's window-12 position bias MLPs loaded into a window-8 model would give other biases."""
    source = microsoft_simmim(torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r'relative_coords_table: checkpoint \(1, 23, 23, 2\) vs model '
                                         r'\(1, 15, 15, 2\): the checkpoint uses window_size=12'):
        convert.convert_state_dict(source, MODEL, **dict(ARCH, window_size=8))
    source = {k: coords_table(6, pretrained=12) if k.endswith('layers.3.blocks.0.attn.relative_coords_table') else v
              for k, v in source.items()}  # stage 3 normalised as by pretrained_window_sizes=(12, 12, 12, 12)
    with pytest.raises(ValueError, match='another pretrained window than the model: pass its pretrained_window_sizes'):
        convert.convert_state_dict(source, MODEL, **ARCH)
