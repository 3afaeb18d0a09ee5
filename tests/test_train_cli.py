"""The ``greenmim`` command: lazy subcommands, help, and errors confined to one subcommand."""
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
