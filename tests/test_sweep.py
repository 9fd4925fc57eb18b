"""Sweeps on Ray Tune: the config checks (before any trial), the seed statistics, and a real 2-arm x 2-seed
sweep of `tiny` on a crop of VNC mitochondria in which one trial's Ray Train worker is killed: the trial is
reported as ERROR (exit 1), and `--resume` finishes it from its checkpoint without rerunning the others."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tifffile
import yaml

from conftest import ROOT, cli, data_path
from vemscale.config import ConfigError
from vemscale.errors import UserError
from vemscale.tune.config import SweepConfig, compose
from vemscale.tune.run import load_sweep_config, plan
from vemscale.tune.stats import describe, mann_whitney, pairwise
from vemscale.tune.validate import check_sweep

VEMSCALE = [sys.executable, "-m", "vemscale.cli"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def _run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(VEMSCALE + args, capture_output=True, text=True, cwd=ROOT, env=_env(), **kw)


@pytest.fixture(scope="module")
def vnc_crop(tmp_path_factory) -> dict:
    """4 slices x 256 x 256 of VNC (image + mitochondria), as TIFFs: slices 0-2 train, 3 validates."""
    d = tmp_path_factory.mktemp("vnc_crop")
    src = data_path("vnc_drosophila_sstem", "train")
    for name, out in (("image.tif", "img.tif"), ("labels_mitochondria.tif", "mito.tif")):
        vol = tifffile.imread(src / name)[:4, 256:512, 256:512]
        tifffile.imwrite(d / out, vol, photometric="minisblack", metadata={"axes": "ZYX"}, compression="zlib")
    vol = lambda s: {"image": str(d / "img.tif"), "labels": str(d / "mito.tif"), "slices": s}  # noqa: E731
    base = {
        "run_dir": str(d / "unused"),
        "data": {"train": [vol("0:3")], "val": [vol("3:4")], "classes": ["background", "mitochondria"],
                 "voxel_size_xyz": [4.6, 4.6, 50]},
        "model": {"name": "tiny"},
        "train": {"iterations": 30, "batch_size": 2, "crop": 64, "log_every": 5, "val_every": 10,
                  "checkpoint_every": 10},
        "tiles": {"tile": 128, "margin": 16, "batch_size": 4},
    }
    (d / "base.yaml").write_text(yaml.safe_dump(base))
    return {"dir": d, "base": d / "base.yaml"}


def _sweep_yaml(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


# --- the config: flat or nested keys, domains, and every check before a trial starts -------------------------


def test_config_forms_and_trial_count():
    cfg = SweepConfig.model_validate({
        "overrides": {"train": {"iterations": 50, "lr": 0.01}, "augment.flips": False},
        "arms": {"a": {}, "b": {"model": {"name": "unet_resnet18"}}},
        "search_space": {"train": {"lr": {"loguniform": [1e-4, 1e-2]}, "crop": [64, 128]}, "freeze": {"choice": ["none"]}},
        "seeds": [0, 1, 2],
        "num_samples": 2,
        "scheduler": "asha",
    })
    assert cfg.overrides == {"train.iterations": 50, "train.lr": 0.01, "augment.flips": False}
    assert cfg.arms["b"] == {"model.name": "unet_resnet18"}
    assert {k: d.kind for k, d in cfg.domains().items()} == {"train.lr": "loguniform", "train.crop": "grid", "freeze": "choice"}
    assert cfg.scheduler.type == "asha"
    assert cfg.n_trials() == 2 * 3 * 2 * 2  # arms x seeds x grid x samples
    with pytest.raises(ValueError, match="exactly one of"):
        SweepConfig.model_validate({"search_space": {"train.lr": {"grid": [1], "choice": [2]}}})
    with pytest.raises(ValueError, match="low > 0"):
        SweepConfig.model_validate({"search_space": {"train.lr": {"loguniform": [0, 1]}}})
    with pytest.raises(ValueError, match="seeds repeat"):
        SweepConfig.model_validate({"seeds": [1, 1]})


def test_command_line_overrides_win():
    cfg = load_sweep_config("configs/sweep_seeds.yaml", ["overrides.train.iterations=100", "seeds=[0,1]",
                                                         "arms.retina.init=elsewhere/checkpoint", "resources.cpus=2"])
    assert cfg.overrides["train.iterations"] == 100 and cfg.overrides["train.crop"] == 128
    assert cfg.seeds == [0, 1] and cfg.arms["retina"]["init"] == "elsewhere/checkpoint"
    assert cfg.arms["retina"]["freeze"] == "vit_blocks" and cfg.resources.worker_resources() == {"CPU": 1.9, "GPU": 0.0}


def test_an_arm_whose_name_has_dots_is_overridden_in_brackets():
    cfg = load_sweep_config("configs/crossdomain_mito.yaml", ["arms[cdeep3m_to_vnc.ssl_multitask].init=p3k/checkpoint"])
    assert cfg.arms["cdeep3m_to_vnc.ssl_multitask"]["init"] == "p3k/checkpoint"
    assert cfg.arms["cdeep3m_to_vnc.ssl_multitask"]["multitask.schedule"] == "ynet"  # the rest of the arm stays
    assert cfg.arms["vnc_to_cdeep3m.ssl_multitask"]["init"] == "runs/pretrain_vnc_cdeep3m/checkpoint"
    with pytest.raises(ConfigError, match="in brackets"):
        load_sweep_config("configs/crossdomain_mito.yaml", ["arms[cdeep3m_to_vnc.ssl.init=x"])


def test_only_runs_the_named_arms_and_rejects_unknown_ones():
    cfg = load_sweep_config("configs/crossdomain_mito.yaml", ["only=[cdeep3m_to_vnc.source_only,vnc_to_cdeep3m.ssl]"])
    assert list(cfg.arms) == ["vnc_to_cdeep3m.ssl", "cdeep3m_to_vnc.source_only"]  # the config's order
    assert cfg.arms["vnc_to_cdeep3m.ssl"]["transfer"] == "retina" and cfg.n_trials() == 2 * 3 and cfg.only is None
    for bad, names in (("only=[ssl]", r"\['ssl'\]"), ("only=[]", "an empty list")):
        with pytest.raises(ConfigError, match=rf"only: .*{names} names no arm of this sweep; its arms are random, retina"):
            load_sweep_config("configs/sweep_seeds.yaml", [bad])


def test_compose_order_and_paths(vnc_crop, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SweepConfig.model_validate({"base": str(vnc_crop["base"]), "overrides": {"train.lr": 0.01, "init": "rel/ckpt"},
                                      "arms": {"a": {"train.lr": 0.02}}, "resources": {"workers": 2}})
    state = plan(cfg)
    data = compose(state, "a", 7, {"train.lr": 0.03}, "/x/trial")
    assert data["train"]["lr"] == 0.03 and data["train"]["seed"] == 7 and data["train"]["workers"] == 2
    assert data["train"]["iterations"] == 30  # from the base
    assert data["init"] == str(tmp_path / "rel" / "ckpt") and data["run_dir"] == "/x/trial"


def _state(vnc_crop, tmp_path, **fields) -> dict:
    return plan(SweepConfig.model_validate({"base": str(vnc_crop["base"]), "run_dir": str(tmp_path / "run"), **fields}))


@pytest.mark.parametrize("fields, message", [
    ({"arms": {"a": {}, "b": {"train.lrr": 0.1}}},
     r"arm 'b': unknown config key 'train.lrr'; valid keys under train: .*\blr\b"),
    ({"search_space": {"train.batchsize": [2, 4]}},
     r"unknown config key 'train.batchsize'; valid keys under train: .*batch_size"),
    ({"search_space": {"modle.name": {"choice": ["tiny"]}}}, r"unknown config key 'modle'; valid keys: .*model"),
    ({"search_space": {"train.crop": [64, 100]}}, r"(?s)train.crop=100: .*multiple of 16"),
    ({"arms": {"x": {"optimizer": "adam"}}}, r"arm 'x': unknown config key 'optimizer'"),
    ({"overrides": {"train.seed": 3}}, r"overrides sets 'train.seed'"),
    ({"search_space": {"train.workers": [1, 2]}}, r"resources.workers"),
    ({"metric": "iou"}, r"metric 'iou' is not reported.*val_iou"),
    ({"arms": {"pre": {"init": "no/such/checkpoint"}}}, r"arm 'pre': init checkpoint .*does not exist.*vemscale pretrain"),
])
def test_every_arm_and_value_is_checked(vnc_crop, tmp_path, fields, message):
    with pytest.raises((ConfigError, UserError), match=message):
        check_sweep(_state(vnc_crop, tmp_path, **fields), prepare_inputs=False)


def test_inputs_opened_per_arm(vnc_crop, tmp_path):
    ok = check_sweep(_state(vnc_crop, tmp_path, arms={"a": {}, "b": {"train.lr": 0.01}},
                            search_space={"train.crop": [64, 128]}))
    assert ok["n_trials"] == 4 and ok["checked"] == 4 and ok["prepared"] == 1  # same data/model: opened once
    bad = {"data.val": [{"image": str(vnc_crop["dir"] / "img.tif"), "labels": str(vnc_crop["dir"] / "missing.tif")}]}
    with pytest.raises(UserError, match=r"arm 'b'.*missing.tif"):
        check_sweep(_state(vnc_crop, tmp_path, arms={"a": {}, "b": bad}))


def test_cli_check_and_bad_key_fail_before_any_trial(vnc_crop, tmp_path):
    cfg = _sweep_yaml(tmp_path / "s.yaml", run_dir=str(tmp_path / "run"), base=str(vnc_crop["base"]),
                      arms={"a": {}, "b": {"train.lr": 0.003}}, seeds=[0, 1])
    r = cli("sweep", cfg, "--check")
    assert r.returncode == 0, r.stderr
    assert "sweep ok: 4 trials" in r.stdout
    r = cli("sweep", cfg, "arms.b.train.lrr=1")
    assert r.returncode == 2 and "unknown config key 'train.lrr'" in r.stderr and "lr," in r.stderr
    r = cli("sweep", "--resume", tmp_path / "nothing")
    assert r.returncode == 2 and "holds no sweep" in r.stderr
    assert not (tmp_path / "run").exists()


# --- statistics ------------------------------------------------------------------------------------------------


def test_describe():
    s = describe([0.5, 0.7, 0.9, None, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2)
    assert (s["min"], s["max"]) == (0.5, 0.9)
    assert describe([0.4])["std"] is None and describe([])["mean"] is None


def test_mann_whitney_exact_values():
    # fully separated 3 vs 3: U = 9 (or 0), exact two-sided p = 2 / C(6, 3) = 0.1
    r = mann_whitney([0.8, 0.85, 0.9], [0.6, 0.65, 0.7])
    assert r["u"] == 9.0 and r["p"] == pytest.approx(0.1) and (r["n_a"], r["n_b"]) == (3, 3)
    assert mann_whitney([0.6, 0.65, 0.7], [0.8, 0.85, 0.9])["u"] == 0.0
    r = mann_whitney([0.1, 0.3, 0.5], [0.2, 0.4, 0.6])  # interleaved: U = 3, p = 0.7
    assert r["u"] == 3.0 and r["p"] == pytest.approx(0.7)
    assert mann_whitney([0.5], [])["p"] is None
    tests = pairwise({"a": [1, 2], "b": [3, 4], "c": [5, 6]})
    assert [(t["arm_a"], t["arm_b"]) for t in tests] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert all(0 <= t["p"] <= 1 for t in tests)


# --- a real sweep: a worker dies, the trial is reported, --resume finishes it --------------------------------


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _train_workers(pid: int):
    out = []
    for p in _descendants(pid):
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                out.append(p)
        except Exception:
            continue
    return out


@pytest.mark.slow  # ~2.5 min of Ray Tune/Train start-ups (4 trials + a resume); the default suite must stay under 15 min
def test_sweep_failed_trial_then_resume(vnc_crop, tmp_path):
    run_dir = tmp_path / "sweep"
    cfg = _sweep_yaml(tmp_path / "s.yaml", run_dir=str(run_dir), base=str(vnc_crop["base"]),
                      arms={"a": {}, "b": {"train.lr": 0.003}}, seeds=[0, 1],
                      resources={"cpus": 0.5})  # all 4 trials at once on 2 cores
    t0 = time.time()
    proc = subprocess.Popen(VEMSCALE + ["sweep", str(cfg), "--json"], cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and killed is None:  # kill one worker once a trial has logged a step
            assert proc.poll() is None, "the sweep ended before a worker could be killed"
            if any(len(p.read_text().splitlines()) > 1 for p in run_dir.glob("trials/*/metrics.csv")):
                workers = _train_workers(proc.pid)
                if workers:
                    killed = workers[0].pid
                    workers[0].send_signal(signal.SIGKILL)
            time.sleep(0.3)
        assert killed, "no trial started training within 300 s"
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first_s = time.time() - t0
    assert proc.returncode == 1, out[-3000:]  # a failed trial fails the sweep
    report = json.loads(out.strip().splitlines()[-1])
    rows = _rows(run_dir / "trials.csv")
    assert len(rows) == 4 and report["failed"] == 1
    failed = [r for r in rows if r["status"] == "ERROR"]
    assert len(failed) == 1 and failed[0]["error"], rows
    assert sorted(r["status"] for r in rows) == ["DONE", "DONE", "DONE", "ERROR"]
    assert "vemscale sweep --resume" in (run_dir / "report.md").read_text()

    t1 = time.time()
    r = _run(["sweep", "--resume", str(run_dir), "--json"], timeout=600)
    resume_s = time.time() - t1
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {x["trial"]: x for x in _rows(run_dir / "trials.csv")}
    assert set(rows) == {x["trial"] for x in _rows(run_dir / "trials.csv")} and len(rows) == 4
    assert all(x["status"] == "DONE" and int(x["iterations"]) == 30 for x in rows.values())
    # finished trials ran once; the failed one ran again, in the same run_dir
    assert {t: int(x["attempts"]) for t, x in rows.items()} == {t: 2 if t == failed[0]["trial"] else 1 for t in rows}
    logged = [int(float(x["iteration"])) for x in _rows(Path(rows[failed[0]["trial"]]["run_dir"]) / "metrics.csv")]
    assert logged == sorted(set(logged)) and logged[-1] == 30  # resumed, not logged twice

    # per arm: 2 seeds each; the p-value between the arms; the figures
    assert {a: s["final_val_iou"]["n"] for a, s in report["arms"].items()} == {"a": 2, "b": 2}
    (test,) = report["mann_whitney"]["final_val_iou"]
    assert isinstance(test["p"], float) and 0.0 <= test["p"] <= 1.0
    summary = _rows(run_dir / "summary.csv")
    assert [s["arm"] for s in summary] == ["a", "b"] and all(s["n"] == "2" for s in summary)
    assert float(_rows(run_dir / "pvalues.csv")[0]["p"]) == pytest.approx(test["p"])
    for name in ("box_final_val_iou", "box_best_val_iou"):
        plot = report["plots"][name]
        assert plot["boxes"] == 2 and Path(plot["path"]).stat().st_size > 5000
    assert Path(report["plots"]["curves_val_iou"]["path"]).stat().st_size > 5000
    assert report["plots"]["curves_val_iou"]["arms_drawn"] == 2
    md = (run_dir / "report.md").read_text()
    assert "box_final_val_iou.png" in md and "curves_val_iou.png" in md and "Mann-Whitney" in md
    print(f"sweep with a killed worker: {first_s:.0f} s; resume: {resume_s:.0f} s")


@pytest.mark.slow  # ~1 min of Ray Tune/Train start-up on 2 cores; the default suite must stay under 15 min
def test_asha_stops_the_weak_trial(vnc_crop, tmp_path):
    """ASHA on the training loss, one trial at a time: the arm that learns (AdamW, lr 1e-3) sets the rungs, the arm
    that barely moves (lr 1e-7, same seed, so the same crops and init) is stopped at the first rung and reported
    STOPPED, which does not fail the sweep."""
    run_dir = tmp_path / "asha"
    cfg = _sweep_yaml(tmp_path / "s.yaml", run_dir=str(run_dir), base=str(vnc_crop["base"]),
                      arms={"learns": {}, "stalls": {"train.lr": 1e-7}}, seeds=[0], metric="loss", mode="min",
                      scheduler={"type": "asha", "grace_period": 10, "reduction_factor": 2}, max_concurrent=1)
    r = _run(["sweep", str(cfg), "--json"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {x["arm"]: x for x in _rows(run_dir / "trials.csv")}
    assert rows["learns"]["status"] == "DONE" and int(rows["learns"]["iterations"]) == 30, rows
    assert rows["stalls"]["status"] == "STOPPED" and 10 <= int(rows["stalls"]["iterations"]) < 30, rows
    assert float(rows["stalls"]["final_loss"]) > float(rows["learns"]["best_loss"])
    assert report["failed"] == 0
    assert "STOPPED" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_sweep_driver_killed_then_resume(vnc_crop, tmp_path):
    """Kill the whole sweep (driver and its local Ray) once a trial has finished: `--resume` runs the rest and
    leaves the finished trials alone."""
    run_dir = tmp_path / "sweep"
    cfg = _sweep_yaml(tmp_path / "s.yaml", run_dir=str(run_dir), base=str(vnc_crop["base"]),
                      arms={"a": {}, "b": {"train.lr": 0.003}}, seeds=[0, 1], resources={"cpus": 1})  # 2 at a time
    proc = subprocess.Popen(VEMSCALE + ["sweep", str(cfg)], cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            ends = [p for p in run_dir.glob("trials/*/attempts.jsonl") if '"end"' in p.read_text()]
            if ends:
                break
            time.sleep(0.3)
        assert ends, "no trial finished within 400 s"
    finally:  # the driver and every process of its local Ray, as a crash would
        family = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for p in family:
            try:
                p.kill()
            except Exception:
                pass
        proc.wait()
    import psutil

    psutil.wait_procs(family, timeout=30)
    started = {p.parent.name for p in run_dir.glob("trials/*/attempts.jsonl")}
    finished = {p.parent.name for p in run_dir.glob("trials/*/attempts.jsonl") if '"done"' in p.read_text()}
    assert 1 <= len(finished) < 4

    r = _run(["sweep", "--resume", str(run_dir), "--json"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["trial"]: x for x in _rows(run_dir / "trials.csv")}
    assert len(rows) == 4 and all(x["status"] == "DONE" for x in rows.values())
    # finished trials are not rerun; interrupted ones ran again, the others once
    expected = {t: 1 if t in finished else 2 if t in started else 1 for t in rows}
    assert {t: int(x["attempts"]) for t, x in rows.items()} == expected
