"""Each command checks its optional packages before any work and says how to install them in
one line (no traceback). Packages are "uninstalled" by patching find_spec."""

import os

import click
import pytest
from click.testing import CliRunner

from pid_fast.cli import main, requirements

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def uninstall(monkeypatch):
    """uninstall(*modules): find_spec reports these modules as absent."""
    real = requirements.find_spec

    def apply(*modules):
        monkeypatch.setattr(requirements, "find_spec", lambda name: None if name in modules else real(name))

    return apply


def _fails_with(result, line):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines() == [line], result.output


def test_require_lists_missing_packages_and_the_extra(uninstall):
    requirements.require("eval", "sklearn", "PIL")  # all there
    uninstall("sklearn", "matplotlib")
    with pytest.raises(click.ClickException) as info:
        requirements.require("eval", "sklearn", "cleanfid", "matplotlib", command="demo")
    assert info.value.message == ("pid-fast demo needs scikit-learn, matplotlib (not installed): "
                                  "pip install 'pid_fast[eval]'")
    assert requirements.missing_modules("sklearn", "cleanfid", "PIL") == ["sklearn"]


def test_require_core_and_extra_in_one_line(uninstall):
    uninstall("PIL", "torchvision")
    with pytest.raises(click.ClickException) as info:
        requirements.require("lpips", "PIL", "torchvision", command="distill")
    assert info.value.message == ("pid-fast distill needs Pillow, torchvision (not installed): "
                                  "pip install Pillow 'pid_fast[lpips]'")
    with pytest.raises(click.ClickException) as info:
        requirements.require(None, "PIL", command="sample")
    assert info.value.message.endswith("pip install Pillow")


def test_demo_checks_before_any_work(tmp_path, uninstall):
    uninstall("sklearn", "matplotlib")
    res = CliRunner().invoke(main, ["demo", "--out-dir", str(tmp_path / "d"), "--steps", "1"])
    _fails_with(res, "Error: pid-fast demo needs scikit-learn, matplotlib (not installed): "
                     "pip install 'pid_fast[eval]'")
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.parametrize("command", ["train-teacher", "train-features"])
def test_digits_trainers_need_scikit_learn(tmp_path, uninstall, command):
    uninstall("sklearn")
    res = CliRunner().invoke(main, [command, "--out", str(tmp_path / "x.safetensors")])
    _fails_with(res, f"Error: pid-fast {command} needs scikit-learn (not installed): pip install 'pid_fast[eval]'")
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_distill_needs_pillow_for_sample_grids(tmp_path, uninstall, config_file):
    uninstall("PIL")
    res = CliRunner().invoke(main, ["distill", "--config", config_file(snapshot_every=2),
                                    "--run-dir", str(tmp_path / "run"), "--threads", "1"])
    _fails_with(res, "Error: pid-fast distill needs Pillow (not installed): pip install Pillow")
    assert not os.path.exists(tmp_path / "run")
    # Without sample grids, Pillow is not needed.
    res = CliRunner().invoke(main, ["distill", "--config", config_file(total_steps=1),
                                    "--run-dir", str(tmp_path / "run"), "--threads", "1"])
    assert res.exit_code == 0, res.output


def test_distill_lpips_needs_the_lpips_package_unless_avg_pooling_has_its_heads(tmp_path, uninstall, config_file):
    uninstall("lpips")
    lpips = ["--set", "loss.norm=lpips", "--set", "loss.lpips_weights=vgg.pth"]
    res = CliRunner().invoke(main, ["distill", "--config", config_file(), "--run-dir", str(tmp_path / "run"), *lpips])
    _fails_with(res, "Error: pid-fast distill needs lpips (not installed): pip install 'pid_fast[lpips]'")
    assert not os.path.exists(tmp_path / "run")
    # Average pooling (VGG's default) with its own heads file needs only torch: the run gets as
    # far as the (missing) weight files.
    res = CliRunner().invoke(main, ["distill", "--config", config_file(), "--run-dir", str(tmp_path / "run2"),
                                    *lpips, "--set", "loss.lpips_lin_weights=heads.pt", "--threads", "1"])
    assert res.exit_code != 0 and "needs lpips" not in res.output and "Traceback" not in res.output
    assert "vgg.pth" in res.output or "heads.pt" in res.output, res.output


def test_fid_needs_clean_fid_and_for_digits_scikit_learn(tmp_path, uninstall, tiny_run):
    uninstall("cleanfid", "sklearn")
    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", "--num", "4"])
    _fails_with(res, "Error: pid-fast fid needs clean-fid, scikit-learn (not installed): pip install 'pid_fast[eval]'")
    uninstall("matplotlib")
    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", "--all-checkpoints"])
    _fails_with(res, "Error: pid-fast fid needs matplotlib (not installed): pip install 'pid_fast[eval]'")
    assert not os.path.exists(tiny_run / "scores-digits.csv")


def test_sample_needs_pillow_only_for_png(tmp_path, uninstall, tiny_run):
    uninstall("PIL")
    res = CliRunner().invoke(main, ["sample", str(tiny_run), str(tmp_path / "png"), "--num", "2"])
    _fails_with(res, "Error: pid-fast sample needs Pillow (not installed): pip install Pillow")
    res = CliRunner().invoke(main, ["sample", str(tiny_run), str(tmp_path / "s.npz"), "--num", "2"])
    assert res.exit_code == 0, res.output
