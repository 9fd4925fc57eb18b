"""The README's main job: `vemscale demo` runs generate -> fine-tune -> infer -> evaluate end to end."""

import json
from pathlib import Path

from conftest import cli


def test_demo_runs_end_to_end_and_infer_reproduces_validation(tmp_path, ray_local):
    # the command line's entry point in this process, on the tests' local Ray (a fresh process would add only the
    # imports and a Ray start-up, ~15 CPU-s, to what `vemscale demo` does)
    r = cli("demo", "iterations=60", f"run_dir={tmp_path / 'demo'}", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("image", "labels", "checkpoint"):
        assert Path(out[key]).exists(), key
    assert all(Path(p).exists() for p in out["prediction"].values())
    assert out["infer_summary"]["blocks"] == out["infer_summary"]["computed"] > 0
    # blockwise inference of the held-out slices scores what fine-tuning's validation measured on them
    assert abs(out["iou"] - out["finetune_val_iou"]) <= 0.01
    assert out["iou"] > 0.5  # the generated mitochondria are easy: even 60 iterations must find them
