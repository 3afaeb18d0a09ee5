"""Publishing (dry run), model cards, and loading published weights: from a file, a local folder, a real local
Hub endpoint (olah serving a git repository, ``HF_ENDPOINT``) and the HF cache offline; and every error case."""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard

import greenmim
from greenmim.hub import Metric, load_manifest, publish
from greenmim.models.manifest import write_release
from greenmim.checkpoint import sha256_file, split_mim_state_dict
from greenmim.hub.loading import load_mim_pretrained, load_pretrained
from train_fixtures import cli_kwargs

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
NAME = 'green_swin_tiny.mim_in1k'
HUB_ID = 'greenmim/green_swin_tiny.mim_in1k'


def run_publish(*argv):
    """``greenmim publish`` in-process, errors raised; returns (exit code, the printed manifest entry)."""
    parser = argparse.ArgumentParser()
    publish.add_arguments(parser)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = publish.run(parser.parse_args([str(a) for a in argv]))
    return code, json.loads(stdout.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope='module')
def mim(tmp_path_factory):
    """A random tiny GreenMIM, saved as a training checkpoint would be."""
    torch.manual_seed(0)
    model = greenmim.GreenMIM('green_swin_tiny', decoder_dim=32, decoder_heads=4, **TINY)
    path = tmp_path_factory.mktemp('ckpt') / 'greenmim_tiny.safetensors'
    safetensors.torch.save_file(model.state_dict(), path)
    return model, path


@pytest.fixture(scope='module')
def published(mim, tmp_path_factory):
    """The repository folder written by ``publish --dry-run`` and the manifest entry it printed."""
    out = tmp_path_factory.mktemp('hub') / 'green_swin_tiny.mim_in1k'
    code, entry = run_publish(mim[1], '--model', 'green_swin_tiny', '--tag', 'mim_in1k', '--out', out, '--dry-run',
                              *cli_kwargs(TINY), '--decoder-heads', 4, '--source-checkpoint', 'test')
    assert code == 0
    return out, entry


def reference_features(mim_model, x):
    with torch.no_grad():
        return mim_model.encoder.eval().forward_features(x)


def test_publish_writes_a_timm_repository(published):
    out, entry = published
    assert sorted(p.name for p in out.iterdir()) == [
        'README.md', 'config.json', 'mim_decoder.safetensors', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'green_swin_tiny' and config['num_classes'] == 0
    assert config['model_args']['embed_dim'] == 16 and config['pretrained_cfg']['tag'] == 'mim_in1k'
    assert not any('NOT YET PUBLISHED' in n for n in config['pretrained_cfg']['notes'])
    assert entry['hub_id'] == HUB_ID and entry['status'] == 'not-published'  # a dry run uploads nothing
    assert entry['sha256'] == sha256_file(out / 'model.safetensors')
    assert entry['decoder_sha256'] == sha256_file(out / 'mim_decoder.safetensors')
    assert not any(k.startswith(('encoder.', 'decoder_', 'mask_token'))
                   for k in safetensors.torch.load_file(out / 'model.safetensors'))


def test_model_card_parses_with_hub_metadata(published):
    card = ModelCard.load(published[0] / 'README.md')
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    assert {'masked-image-modeling', 'timm', 'swin-transformer'} <= set(card.data.tags)
    assert 'A Swin Transformer encoder pre-trained with GreenMIM' in card.text
    assert card.data.datasets == ['imagenet-1k'] and card.data.metrics
    for section in ('## Usage', '## Training recipe', '## Speed vs SimMIM', '## Citation', 'Not published yet'):
        assert section in card.text
    assert f'timm.create_model("{NAME}", pretrained=True)' in card.text


def test_finetuned_card_carries_measured_metrics(tmp_path):
    torch.manual_seed(1)
    checkpoint = tmp_path / 'ft.safetensors'
    safetensors.torch.save_file(timm.create_model('green_swin_tiny', **TINY).state_dict(), checkpoint)
    metrics = tmp_path / 'metrics.json'
    metrics.write_text(json.dumps([{'name': 'top1', 'value': 12.5, 'dataset': 'imagenet-1k/validation',
                                    'command': 'greenmim finetune --eval-only ...'}]))
    _, entry = run_publish(checkpoint, '--model', 'green_swin_tiny', '--tag', 'mim_in1k_ft_in1k', '--out',
                           tmp_path / 'repo', '--dry-run', *cli_kwargs(TINY), '--metrics', metrics)
    card = ModelCard.load(tmp_path / 'repo' / 'README.md')
    assert card.data.pipeline_tag == 'image-classification'
    assert card.data.eval_results[0].metric_value == 12.5 and entry['metrics'][0]['command']
    assert 'mim_decoder' not in card.text and 'greenmim finetune --eval-only' in card.text


def test_publish_refuses_bad_input(mim, published, tmp_path, monkeypatch):
    common = ['--model', 'green_swin_tiny', *cli_kwargs(TINY)]
    with pytest.raises(ValueError, match='not empty'):
        run_publish(mim[1], *common, '--tag', 'mim_in1k', '--out', published[0], '--dry-run')
    with pytest.raises(ValueError, match='needs a classifier checkpoint'):
        run_publish(mim[1], *common, '--tag', 'mim_in1k_ft_in1k', '--out', tmp_path / 'a', '--dry-run')
    with pytest.raises(ValueError, match='not in the manifest: give --repo-id'):
        run_publish(mim[1], *common, '--tag', 'mim_in22k', '--out', tmp_path / 'b', '--dry-run')
    monkeypatch.delenv('HF_TOKEN', raising=False)
    with pytest.raises(ValueError, match='set HF_TOKEN'):
        run_publish(mim[1], *common, '--tag', 'mim_in1k', '--out', tmp_path / 'c')
    assert not (tmp_path / 'c').exists()


def test_publish_takes_encoder_and_decoder_files(mim, published, tmp_path):
    """``greenmim export`` writes the encoder (timm layout) and the decoder apart: same repository."""
    encoder, decoder = split_mim_state_dict(mim[0].state_dict())
    safetensors.torch.save_file(encoder, tmp_path / 'model.safetensors')
    safetensors.torch.save_file(decoder, tmp_path / 'decoder.safetensors')
    run_publish(tmp_path / 'model.safetensors', '--decoder', tmp_path / 'decoder.safetensors',
                '--model', 'green_swin_tiny', '--tag', 'mim_in1k', '--out', tmp_path / 'repo', '--dry-run',
                *cli_kwargs(TINY), '--decoder-heads', 4)
    for name in ('model.safetensors', 'mim_decoder.safetensors'):  # (header metadata order is not reproducible)
        ours, reference = (safetensors.torch.load_file(d / name) for d in (tmp_path / 'repo', published[0]))
        assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_loads_from_file_and_local_dir(mim, published):
    out = published[0]
    x = torch.randn(1, 3, 224, 224)
    expected = reference_features(mim[0], x)
    models = [
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')),
                          **TINY),
        timm.create_model(f'local-dir:{out}', pretrained=True),
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(source='local-dir', file=str(out)),
                          **TINY),
        load_pretrained(NAME, pretrained_cfg_overlay=dict(hf_hub_id=f'local-dir:{out}'), **TINY),
        load_pretrained(f'local-dir:{out}'),
    ]
    for model in models:
        with torch.no_grad():
            torch.testing.assert_close(model.eval().forward_features(x), expected, rtol=0, atol=0)


def test_mim_decoder_roundtrip(mim, published):
    loaded = load_mim_pretrained(f'local-dir:{published[0]}')
    assert isinstance(loaded, greenmim.GreenMIM) and loaded.decoder_blocks[0].attn.num_heads == 4
    for k, v in mim[0].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_unpublished_tag_fails_at_once():
    releases = load_manifest()
    assert timm.list_models('green_*', pretrained=True) == sorted(n for n, r in releases.items() if r.published)
    name, release = next((n, r) for n, r in releases.items() if not r.published)
    assert timm.create_model(name, **TINY).pretrained_cfg.get('hf_hub_id') is None
    assert timm.list_pretrained('green_*') == []  # nothing loadable yet
    for error, make in ((RuntimeError, lambda: timm.create_model(name, pretrained=True, **TINY)),
                        (ValueError, lambda: load_pretrained(name, **TINY))):
        with pytest.raises(error) as e:
            make()
        message = str(e.value)
        assert message.startswith(f'No pretrained weights exist for {name}: not published yet (planned at '
                                  f'{release.hub_id})'), message
        assert all(s in message for s in ("pretrained_cfg_overlay=dict(file='export/model.safetensors')",
                                          'greenmim export', 'greenmim convert', 'docs/hub.md', 'greenmim models'))
    with pytest.raises(RuntimeError, match=r'for green_swin_tiny\.mim_in1k_ft_in1k: not published yet'):
        timm.create_model('green_swin_tiny', pretrained=True, **TINY)  # the default tag, named
    # the default tag is the fine-tuned classifier even without weights
    assert timm.create_model('green_swin_tiny', **TINY).num_classes == 1000


def test_load_errors_name_the_problem(published, tmp_path):
    out = published[0]
    truncated = tmp_path / 'truncated.safetensors'
    truncated.write_bytes((out / 'model.safetensors').read_bytes()[:4000])
    with pytest.raises(ValueError, match=r'truncated, corrupt'):
        load_pretrained(NAME, pretrained_cfg_overlay=dict(file=str(truncated)), **TINY)
    other = tmp_path / 'other.safetensors'
    safetensors.torch.save_file(timm.create_model('resnet10t').state_dict(), other)
    with pytest.raises(ValueError, match=r'does not fit .*\(0/\d+ keys found\).*another model'):
        load_pretrained(NAME, pretrained_cfg_overlay=dict(file=str(other)), **TINY)
    with pytest.raises(ValueError, match=r'shape mismatch: patch_embed\.proj\.weight'):
        load_pretrained(NAME, pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')),
                        **dict(TINY, embed_dim=32))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_pretrained(NAME, pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope.safetensors')), **TINY)
    with pytest.raises(FileNotFoundError, match='not a directory'):
        load_pretrained(NAME, pretrained_cfg_overlay=dict(hf_hub_id=f'local-dir:{tmp_path / "nope"}'), **TINY)
    with pytest.raises(FileNotFoundError, match='has no model.safetensors'):
        load_pretrained(NAME, pretrained_cfg_overlay=dict(hf_hub_id=f'local-dir:{tmp_path}'), **TINY)


def test_other_window_or_patch_size_is_refused_not_resampled(published):
    """timm's filter would resample the relative-position tables / patch embedding to fit; the loader refuses and
    names the size the weights were made for."""
    weights = dict(file=str(published[0] / 'model.safetensors'))
    with pytest.raises(ValueError, match=r'relative_position_bias_table.*uses window_size=7 .*not resampled'):
        load_pretrained(NAME, pretrained_cfg_overlay=weights, **dict(TINY, window_size=14))
    with pytest.raises(ValueError, match=r'patch_embed\.proj\.weight.*uses patch size \(4, 4\): pass patch_size=4'):
        load_pretrained(NAME, pretrained_cfg_overlay=weights, **dict(TINY, patch_size=8))


def test_broken_config_json_is_named(published, tmp_path):
    folder = tmp_path / 'repo'
    shutil.copytree(published[0], folder)
    (folder / 'config.json').write_text('{"architecture": "green_swin_tiny",')
    with pytest.raises(ValueError, match=f'{folder / "config.json"} is not valid JSON'):
        load_pretrained(f'local-dir:{folder}')


# --- a real local Hub endpoint -------------------------------------------------------------------------------

_CLIENT = r'''
import json, os, sys, torch, timm, greenmim
from greenmim.hub.loading import load_mim_pretrained, load_pretrained
tiny, x_path, result_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
x, out = torch.load(x_path), {'listed': timm.list_pretrained('green_*')}
with torch.no_grad():
    for label, make in [
            ('registry', lambda: timm.create_model('green_swin_tiny.mim_in1k', pretrained=True, **tiny)),
            ('hf-hub', lambda: timm.create_model('hf-hub:greenmim/green_swin_tiny.mim_in1k', pretrained=True)),
            ('helper', lambda: load_pretrained('green_swin_tiny.mim_in1k', **tiny)),
            ('missing', lambda: load_pretrained('hf-hub:greenmim/no_such_model')),
            ('missing-overlay', lambda: load_pretrained(
                'green_swin_tiny.mim_in1k', pretrained_cfg_overlay=dict(hf_hub_id='greenmim/no_such_model'), **tiny))]:
        try:
            out[label] = make().eval().forward_features(x).tolist()
        except Exception as e:
            out[label] = f'{type(e).__name__}: {e}'
    for label, manifest, load in [  # same hub id, another sha256 of the weights / of the decoder
            ('sha256', 'BAD_MANIFEST', load_pretrained), ('decoder_sha256', 'BAD_DECODER_MANIFEST', load_mim_pretrained)]:
        os.environ['GREENMIM_HUB_MANIFEST'] = os.environ[manifest]
        try:
            load('green_swin_tiny.mim_in1k', **tiny)
            out[label] = 'loaded'
        except ValueError as e:
            out[label] = str(e)
json.dump(out, open(result_path, 'w'))
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _git(repo, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME='t', GIT_AUTHOR_EMAIL='t@t', GIT_COMMITTER_NAME='t',
               GIT_COMMITTER_EMAIL='t@t')
    subprocess.run(['git', *args], cwd=repo, env=env, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope='module')
def hub_endpoint(published, tmp_path_factory):
    """olah on 127.0.0.1 serving the published folder as the git repository ``greenmim/green_swin_tiny.mim_in1k``
    (offline: it never contacts the real Hub). Started and stopped here, within bounded time."""
    pytest.importorskip('olah', reason='olah is in the test extra: pip install -e .[test]')
    root = tmp_path_factory.mktemp('olah')
    repo = root / 'mirrors' / 'models' / 'greenmim' / 'green_swin_tiny.mim_in1k'
    shutil.copytree(published[0], repo)
    _git(repo, 'init', '-q', '-b', 'main')
    _git(repo, 'add', '.')
    _git(repo, 'commit', '-q', '-m', 'green_swin_tiny.mim_in1k')
    port = _free_port()
    (root / 'configs.toml').write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "cache"}"\n'
        f'mirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        f'mirrors-path = ["{root / "mirrors"}"]\n[accessibility]\noffline = true\n')
    log = open(root / 'olah.log', 'wb')
    server = subprocess.Popen([sys.executable, '-m', 'olah.server', '-c', str(root / 'configs.toml'),
                               '--log-path', str(root / 'logs')], cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f'{url}/{HUB_ID}/resolve/main/config.json', timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f'olah did not start: {(root / "olah.log").read_text()[-2000:]}')
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def _run_client(tmp_path, env, x):
    torch.save(x, tmp_path / 'x.pt')
    result = tmp_path / 'result.json'
    proc = subprocess.run(
        [sys.executable, '-c', _CLIENT, json.dumps(TINY), str(tmp_path / 'x.pt'), str(result)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(result.read_text()), stderr=proc.stderr)


def test_pretrained_download_from_hub_endpoint_then_offline_cache(mim, published, hub_endpoint, tmp_path):
    """Published in a manifest, the registry tag downloads from the Hub API, gives the published outputs, and then
    loads from the filled HF cache with ``HF_HUB_OFFLINE=1``."""
    out, entry = published
    manifest, bad_manifest = tmp_path / 'manifest.json', tmp_path / 'bad_manifest.json'
    bad_decoder_manifest = tmp_path / 'bad_decoder_manifest.json'
    release = dict(entry, status='published')
    manifest.write_text(json.dumps({'schema': 1, 'releases': [release]}))
    bad_manifest.write_text(json.dumps({'schema': 1, 'releases': [dict(release, sha256='0' * 64)]}))
    bad_decoder_manifest.write_text(json.dumps({'schema': 1, 'releases': [dict(release, decoder_sha256='0' * 64)]}))
    x = torch.randn(1, 3, 224, 224)
    expected = reference_features(mim[0], x).tolist()
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HOME=str(tmp_path / 'hf'), HF_ENDPOINT=hub_endpoint, HF_HUB_DISABLE_TELEMETRY='1',
               HF_HUB_ETAG_TIMEOUT='5', HF_HUB_DOWNLOAD_TIMEOUT='5', GREENMIM_HUB_MANIFEST=str(manifest),
               BAD_MANIFEST=str(bad_manifest), BAD_DECODER_MANIFEST=str(bad_decoder_manifest))

    online = _run_client(tmp_path, env, x)
    assert online['listed'] == [NAME] and 'offline' not in online['stderr']
    for label in ('registry', 'hf-hub', 'helper'):
        assert online[label] == expected, (label, str(online[label])[:300])
    assert online['missing'].startswith('FileNotFoundError: no repository greenmim/no_such_model')
    assert online['missing-overlay'].startswith('FileNotFoundError: no repository greenmim/no_such_model')
    assert 'is not the published green_swin_tiny.mim_in1k' in online['sha256']
    assert re.search(r'mim_decoder\.safetensors \(sha256 \w+\.\.\.\) is not the published', online['decoder_sha256'])

    offline = _run_client(tmp_path, dict(env, HF_HUB_OFFLINE='1', HF_ENDPOINT='http://127.0.0.1:9'), x)
    for label in ('registry', 'hf-hub', 'helper'):
        assert offline[label] == expected, (label, str(offline[label])[:300])
    assert 'is not in the HF cache' in offline['missing'] and 'HF_HUB_OFFLINE=1' in offline['missing']

    # no HF_HUB_OFFLINE, an endpoint that does not answer: offline at once (one line), from the cache
    unreachable = _run_client(tmp_path, dict(env, HF_ENDPOINT='http://127.0.0.1:9'), x)
    for label in ('registry', 'hf-hub', 'helper'):
        assert unreachable[label] == expected, (label, str(unreachable[label])[:300])
    assert 'is not in the HF cache' in unreachable['missing']
    notes = [line for line in unreachable['stderr'].splitlines() if line.startswith('offline: ')]
    assert notes == ['offline: no answer from http://127.0.0.1:9 within 3 s (<urlopen error [Errno 111] Connection '
                     'refused>); greenmim/green_swin_tiny.mim_in1k comes from the HF cache only (as with '
                     'HF_HUB_OFFLINE=1)'], unreachable['stderr'][-2000:]


def test_manifest_entries_are_validated_and_written(tmp_path):
    shipped = load_manifest()
    assert {r.hub_id for r in shipped.values()} == {f'greenmim/{name}' for name in shipped}
    assert not any(r.published for r in shipped.values())
    release = shipped[NAME]
    with pytest.raises(ValueError, match='needs sha256 and source_checkpoint'):
        dataclasses.replace(release, status='published')
    with pytest.raises(ValueError, match='full "org/name" id outside timm/'):
        dataclasses.replace(release, hub_id='timm/green_swin_tiny.mim_in1k')
    with pytest.raises(ValueError, match='status'):
        dataclasses.replace(release, status='uploaded')
    with pytest.raises(ValueError, match='has no command'):
        Metric('top1', 80.0, 'imagenet-1k/validation', '')
    path = tmp_path / 'manifest.json'
    published_release = dataclasses.replace(release, status='published', sha256='ab' * 32, source_checkpoint='run-1')
    write_release(release, path)
    write_release(published_release, path)  # replaces the entry of the same model.tag
    assert load_manifest(path) == {NAME: published_release}
    path.write_text(json.dumps({'releases': [release.to_dict(), release.to_dict()]}))
    with pytest.raises(ValueError, match='listed twice'):
        load_manifest(path)


AUTHORS = {  # release -> (Google Drive id in the authors' README, model kwargs, reported top-1)
    'green_swin_base.mim_in1k_authors': ('1vCt7QN3rNC7hmWlWYomqfhjUqN-PvR7a', {}, 83.8),
    'green_swin_base.mim_in1k_authors_w14': ('1P1dAdcZtSEGWFQy5GeeJdfGTqesSAES9', {'window_size': 14}, None),
    'green_swin_large.mim_in1k_authors_w14': ('1Tw1KeGviVWxbVt3h1TT7BxTX1aLeT-Nm', {'window_size': 14}, 85.1),
}


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_authors_checkpoints_are_listed_with_the_command_that_releases_them():
    from greenmim.hub import convert
    releases = load_manifest()
    for name, (drive_id, kwargs, top1) in AUTHORS.items():
        release = releases[name]
        assert (release.status, release.license, release.model_kwargs) == ('not-published', 'cc-by-nc-4.0', kwargs)
        assert release.source_checkpoint == f'https://drive.google.com/file/d/{drive_id}/view?usp=sharing'
        assert [m.value for m in release.metrics] == ([top1] if top1 else [])
        assert all(m.reported_by.startswith('https://github.com/LayneH/GreenMIM/') for m in release.metrics)
        assert set(release.recipe) == {'pre-training', 'conversion', 'fine-tuning'}
        first, second = (shlex.split(part) for part in release.release_command.split(' && '))
        assert first[:2] == ['greenmim', 'convert'] and second[:2] == ['greenmim', 'publish']
        conv, pub = _parse(convert, first[2:]), _parse(publish, second[2:])
        assert (str(conv.checkpoint), conv.model, conv.model_kwargs, conv.merge_order) == (
            '$CKPT', release.model, kwargs, 'early')
        assert (pub.checkpoint, pub.model, pub.tag, pub.source_checkpoint, str(pub.manifest)) == (
            conv.output, release.model, release.tag, release.source_checkpoint, 'greenmim/models/manifest.json')
        assert not pub.dry_run and pub.model_kwargs == {}  # publish takes the kwargs from this entry
        with torch.device('meta'):
            model = timm.create_model(name, **kwargs)  # registered in timm, headless
        assert model.num_classes == 0 and model.pretrained_cfg['tag'] == release.tag
        assert not model.pretrained_cfg.get('hf_hub_id') and model.pretrained_cfg['license'] == 'cc-by-nc-4.0'
    with pytest.raises(ValueError, match='mim_in1k_authors: not published yet'):
        load_pretrained('green_swin_base.mim_in1k_authors')


def test_card_of_a_reported_number_says_where_it_was_reported():
    from greenmim.hub.card import render_model_card
    release = load_manifest()['green_swin_base.mim_in1k_authors']
    card = ModelCard(render_model_card(release, timm.create_model('green_swin_tiny', **TINY)))
    assert card.data.eval_results[0].source_url == release.metrics[0].reported_by
    assert f'| imagenet-1k/validation | top1 | 83.8 | reported at <{release.metrics[0].reported_by}>' in card.text
