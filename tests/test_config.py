import pytest

from vemscale.config import ConfigError, load_config, parse_overrides
from vemscale.train.finetune import FinetuneConfig


def test_overrides_are_typed_and_nested():
    o = parse_overrides(["train.iterations=200", "model.name=tiny", "data.voxel_size_xyz=4,4,40", "train.use_gpu=false"])
    assert o == {"train": {"iterations": 200, "use_gpu": False}, "model": {"name": "tiny"}, "data": {"voxel_size_xyz": [4, 4, 40]}}


def test_yaml_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: runs/a\ntrain:\n  iterations: 10\n  lr: 0.01\n")
    cfg = load_config(FinetuneConfig, p, ["train.iterations=20", "run_dir=/tmp/x"])
    assert cfg.train.iterations == 20 and cfg.train.lr == 0.01 and str(cfg.run_dir) == "/tmp/x"


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.iteratons'.*iterations"):
        load_config(FinetuneConfig, None, ["train.iteratons=5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus'.*run_dir"):
        load_config(FinetuneConfig, None, ["bogus=1"])


def test_bad_values_are_explained():
    with pytest.raises(ConfigError, match="train.crop"):
        load_config(FinetuneConfig, None, ["train.crop=100"])
    with pytest.raises(ConfigError, match="divisible by workers"):
        load_config(FinetuneConfig, None, ["train.batch_size=5", "train.workers=2"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(FinetuneConfig, None, ["train.crop"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(FinetuneConfig, "/no/such/config.yaml")


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("finetune_*.yaml")):
        load_config(FinetuneConfig, path)


def test_override_with_colons_stays_text():
    """`10:20` is a range and `s3://b/v` a URL, not YAML 1.1 base-60 numbers or mappings."""
    from vemscale.config import parse_overrides

    assert parse_overrides(["roi=10:20,0:64,:", "input=s3://bucket/vol.zarr", "a.b=10:20"]) == {
        "roi": "10:20,0:64,:", "input": "s3://bucket/vol.zarr", "a": {"b": "10:20"}}
