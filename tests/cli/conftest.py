"""Tiny runs and configs for the CLI tests."""

import json

import pytest

from pid_fast.train import train

# A ~9k-parameter student that writes digits-shaped images (1 x 16 x 16), so the bundled digits
# feature network can score it; the gaussian teacher needs no file.
DIGITS_NET = {"name": "tiny-ddpmpp", "model_channels": 8, "channel_mult": [1], "attn_resolutions": [],
              "img_resolution": 16, "in_channels": 1, "out_channels": 1}


def _tiny_config(**over):
    cfg = {"device": "cpu", "teacher": {"kind": "gaussian", "mean": 0.0, "std": 0.5},
           "student": {"init": "random", "network": DIGITS_NET, "seed": 1}, "batch_size": 4, "total_steps": 4,
           "log_every": 2, "checkpoint_every": 2, "keep_checkpoints": 0, "snapshot_every": 0, "progress": False,
           "ema_rates": [0.5, 0.9], "optimizer": {"lr": 1e-3}}
    cfg.update(over)
    return cfg


@pytest.fixture
def tiny_config():
    """tiny_config(**over): a config dict of a 4-step CPU run of a digits-shaped student."""
    return _tiny_config


@pytest.fixture
def tiny_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (EMA rates 0.5 and 0.9)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    train(_tiny_config(), run)
    return run


@pytest.fixture
def config_file(tmp_path):
    def write(**over):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(_tiny_config(**over)))
        return str(path)

    return write
