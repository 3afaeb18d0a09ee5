"""The ``greenmim`` command: lazy subcommands, help, and errors confined to one subcommand."""
import argparse
import importlib
import os
import subprocess
import sys

import pytest

from greenmim import cli


def test_unknown_or_missing_command_exits_with_usage(capsys):
    for argv in ([], ['train']):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    assert 'pretrain' in capsys.readouterr().err


def test_broken_subcommand_module_affects_only_that_subcommand(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, 'publish', 'greenmim.hub.no_such_module')
    assert cli.main(['publish']) == 1
    assert 'greenmim publish: unavailable' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(['export', '--help'])
    assert e.value.code == 0 and 'model.safetensors' in capsys.readouterr().out


def test_pretrain_flags_mirror_the_config():
    import argparse
    from greenmim.train.config import config_from_args
    from greenmim.train.pretrain import PretrainConfig, add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(['--model-kwargs', 'window_size=4', 'depths=(2,2,2,2)', '--betas', '0.9', '0.99',
                              '--no-norm-pix-loss', '--max-steps', '5', '--lr', '1e-3'])
    cfg = config_from_args(PretrainConfig, args)
    assert cfg.model_kwargs == {'window_size': 4, 'depths': (2, 2, 2, 2)}
    assert cfg.betas == (0.9, 0.99) and cfg.norm_pix_loss is False and cfg.max_steps == 5 and cfg.lr == 1e-3
    assert config_from_args(PretrainConfig, parser.parse_args([])) == PretrainConfig()


def test_help_and_version_import_neither_torch_nor_timm():
    code = ('import sys, greenmim_cli\n'
            'for argv in (["--help"], ["--version"]):\n'
            '    try:\n'
            '        greenmim_cli.main(argv)\n'
            '    except SystemExit:\n'
            '        pass\n'
            'print(sorted(m for m in ("torch", "timm", "greenmim") if m in sys.modules))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    assert out[-1] == '[]', out
    assert out[-2].startswith('greenmim 0.') and all(f'  {c}  ' in proc.stdout for c in ('pretrain', 'models'))
    for command, summary in cli.SUMMARIES.items():  # one line per subcommand in greenmim --help
        assert any(line.split() == [command, *summary.split()] for line in out), command


def _options(command):
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    importlib.import_module(cli.COMMANDS[command]).add_arguments(parser)
    return parser, [a for a in parser._actions if a.option_strings and a.dest != 'help']


@pytest.mark.parametrize('command', sorted(cli.COMMANDS))
def test_every_flag_has_help_with_its_default(command):
    parser, options = _options(command)
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    text = ' '.join(parser.format_help().split())
    for a in options:
        if a.default is not None and not isinstance(a.default, bool) and a.default != {}:
            assert f'(default: {a.default})' in text, a.dest


def test_model_kwargs_have_one_syntax_in_every_command():
    for command in ('pretrain', 'finetune', 'convert', 'publish'):
        parser, options = _options(command)
        kwargs = next(a for a in options if a.dest == 'model_kwargs')
        assert kwargs.metavar == 'KEY=VALUE' and kwargs.default == {}, command
        parsed = argparse.Namespace()
        kwargs(parser, parsed, [kwargs.type(v) for v in ('window_size=14', 'depths=(2,2,6,2)', 'act=gelu')])
        assert parsed.model_kwargs == {'window_size': 14, 'depths': (2, 2, 6, 2), 'act': 'gelu'}, command


def test_choices_are_listed_in_the_help():
    parser, options = _options('pretrain')
    choices = {a.dest: a.choices for a in options if a.choices}
    assert choices == {'amp': ('auto', 'bf16', 'fp16', 'none'), 'method': ('greenmim', 'simmim'),
                       'mask_mode': ('batch', 'image'), 'data_format': ('auto', 'folder', 'parquet', 'imagefolder',
                                                                         'hub')}


def test_models_lists_every_tag_with_its_weights_status(capsys):
    assert cli.main(['models', 'green_swin_base']) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:-1]]
    assert {r[1] for r in rows} == {'mim_in1k', 'mim_in1k_ft_in1k*', 'mim_in1k_authors', 'mim_in1k_authors_w14'}
    assert all(r[0] == 'green_swin_base' and r[2] == '224x224' and ' '.join(r[3:6]) == 'not published yet'
               for r in rows)
    assert cli.main(['models', 'resnet*']) == 2
    assert 'greenmim models: error: no green model matches' in capsys.readouterr().err


def test_hub_data_without_an_answering_endpoint_fails_fast_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HOME=str(tmp_path / 'hf'), HF_ENDPOINT='http://127.0.0.1:9')  # refused at once, HF_HUB_OFFLINE unset
    proc = subprocess.run([sys.executable, '-m', 'greenmim_cli', 'pretrain', '--data', 'org/name', '--epochs', '2',
                           '--output-dir', str(tmp_path / 'run')], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr[-3000:]
    assert lines[0].startswith('offline: no answer from http://127.0.0.1:9 within 3 s') and 'org/name' in lines[0]
    assert lines[1].startswith("greenmim pretrain: error: could not load data source 'org/name'"), lines[1]
    assert [p.name for p in (tmp_path / 'run').iterdir()] == ['.greenmim.lock']  # nothing else written
