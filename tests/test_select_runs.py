"""`vemscale select`: the morphology rule across runs picks the run whose chosen checkpoint has the smallest
distance (a hand-written list of runs and distances), copies exactly that checkpoint, reads a sweep's arm, and
refuses runs that are not comparable before anything is written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from vemscale.checkpoint import CheckpointMeta, save_checkpoint
from vemscale.cli import main
from vemscale.errors import UserError
from vemscale.models import create_model
from vemscale.train.select import summarise
from vemscale.train.select_runs import select_runs

TARGET = {"image": "/data/target.tif", "slices": "16:20", "max_slices": 8, "match_histogram": False}
SELECTION = {"class_name": None, "threshold": 0.5, "min_size": 10, "objects": "stack", "prior": None}


def fake_run(d: Path, seed: int, distances: list[float], ious: list[float] | None = None, prior: float = 0.88,
             target: dict | None = None, selection: dict | None = None, method: str = "morphology") -> Path:
    """A run dir as a select=morphology fine-tune leaves it: selection.json with one entry per validation interval
    (summarised by the fine-tune's own `summarise`) and, in selected/, a checkpoint of its own weights (the seed)."""
    d.mkdir(parents=True)
    intervals = [{"iteration": 100 * (i + 1), "select_distance": x} for i, x in enumerate(distances)]
    for i, iou in enumerate(ious or []):
        intervals[i]["target_iou"] = iou
    rec = {"method": method, "prior": prior, "intervals": intervals, **summarise(intervals)}
    (d / "selection.json").write_text(json.dumps(rec))
    torch.manual_seed(seed)
    model = create_model("tiny", in_chans=1, num_classes=2)
    cfg = {"target": {**(target or TARGET), "labels": f"/data/labels{seed}.tif"}, "selection": selection or SELECTION}
    save_checkpoint(d / "selected", model, CheckpointMeta(model=model.spec, tile=64, margin=8,
                                                          classes=["background", "mito"], train_config=cfg))
    return d


def test_the_run_with_the_smallest_chosen_distance_is_picked_and_copied(tmp_path):
    # per run: distances per interval; the chosen per run are 0.030, 0.012 (run b's 2nd interval), 0.020
    a = fake_run(tmp_path / "a", 0, [0.05, 0.03], ious=[0.30, 0.35])
    b = fake_run(tmp_path / "b", 1, [0.04, 0.012, 0.09], ious=[0.20, 0.41, 0.38])
    c = fake_run(tmp_path / "c", 2, [0.02], ious=[0.50])
    out = select_runs([a, b, c], copy_to=tmp_path / "picked")
    assert out["run_dir"] == str(b) and out["iteration"] == 200 and out["distance"] == 0.012
    assert out["target_iou"] == 0.41 and out["oracle_target_iou"] == 0.50  # labels only reported, never chosen
    assert out["mean_target_iou"] == pytest.approx((0.35 + 0.41 + 0.50) / 3)
    assert out["checkpoint"] == str(tmp_path / "picked")
    for f in ("model.pt", "vemscale.json"):
        assert (tmp_path / "picked" / f).read_bytes() == (b / "selected" / f).read_bytes()
    assert (tmp_path / "picked" / "model.pt").read_bytes() != (a / "selected" / "model.pt").read_bytes()
    # ties go to the first run given
    d = fake_run(tmp_path / "d", 3, [0.012])
    assert select_runs([d, b])["run_dir"] == str(d) and select_runs([b, d])["run_dir"] == str(b)


def test_a_sweeps_arm_is_read_from_its_trials(tmp_path):
    sweep = tmp_path / "sweep"
    rows = []
    for arm, seed, dist in (("x.ssl", 0, 0.03), ("x.ssl", 1, 0.01), ("x.source_only", 0, 0.001), ("x.ssl", 2, 0.02)):
        run = fake_run(sweep / "trials" / f"{arm}_seed{seed}", seed, [dist])
        rows.append({"arm": arm, "seed": seed, "status": "DONE", "run_dir": f"/elsewhere/{run.name}"})  # a copied sweep
    rows.append({"arm": "x.ssl", "seed": 3, "status": "ERROR", "run_dir": "/nowhere"})
    with open(sweep / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = select_runs([sweep], arm="x.ssl")
    assert Path(out["run_dir"]).name == "x.ssl_seed1" and len(out["runs"]) == 3
    with pytest.raises(UserError, match="name one with --arm"):
        select_runs([sweep])
    with pytest.raises(UserError, match="no finished trials of arm 'x.hist'"):
        select_runs([sweep], arm="x.hist")


@pytest.mark.parametrize("other,message", [
    ({"prior": 0.5}, "runs of other source labels are not comparable"),
    ({"target": {**TARGET, "slices": "0:4"}}, "was selected with target {'slices': '0:4'}"),
    ({"selection": {**SELECTION, "threshold": 0.6}}, "was selected with selection {'threshold': 0.6}"),
    ({"method": "area_ratio"}, "was selected with method area_ratio"),
    ({"distances": [float("nan")]}, "cannot be compared, leave this run out"),
])
def test_runs_that_are_not_comparable_fail_and_nothing_is_copied(tmp_path, capsys, other, message):
    a = fake_run(tmp_path / "a", 0, [0.05])
    b = fake_run(tmp_path / "b", 1, **{"distances": [0.01], **other})
    assert main(["select", str(a), str(b), "--copy", str(tmp_path / "picked")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "picked").exists()


def test_a_set_prior_equal_to_a_measured_one_is_comparable(tmp_path):
    a = fake_run(tmp_path / "a", 0, [0.05])
    b = fake_run(tmp_path / "b", 1, [0.01], selection={**SELECTION, "prior": 0.88})  # set by hand, same value
    assert select_runs([a, b])["run_dir"] == str(b)


def test_bad_runs_and_destinations_fail_clearly_and_touch_nothing(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0, [0.05])
    b = fake_run(tmp_path / "b", 1, [0.01])
    plain = tmp_path / "plain"
    plain.mkdir()
    no_selected = fake_run(tmp_path / "last", 2, [0.02])  # select=last with a target: a record, no selected/
    shutil.rmtree(no_selected / "selected")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for args, message in (
        ([a, plain], "fine-tune with select=morphology target=<volume> first"),
        ([a, no_selected], "fine-tune with select=morphology target=<volume> first"),
        ([a, b, tmp_path / "b" / "." ], "is given twice"),
        ([a, "--copy", used], "is not an empty directory"),
        ([a, b, "--copy", b / "selected" / "best"], "is inside (or holds) run"),
        ([a, b, "--copy", tmp_path], "is not an empty directory"),
    ):
        assert main(["select", *map(str, args)]) == 2, args
        assert message in capsys.readouterr().err, args
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before and (used / "keep.txt").read_text() == "x"


def test_selection_bench_draws_k_seeds_of_every_setting():
    """`crossdomain_select` draws: every k-subset of one pool, or k of each labelled setting (their product)."""
    import itertools

    from vemscale.bench.crossdomain_select import draws

    pool = [{"seed": i, "setting": "1k" if i < 4 else "2k"} for i in range(7)]
    mixed = draws(pool, 2)
    assert len(mixed) == 6 * 3  # C(4,2) x C(3,2)
    assert all(sorted(c["setting"] for c in d) == ["1k", "1k", "2k", "2k"] for d in mixed)
    assert len({tuple(c["seed"] for c in d) for d in mixed}) == len(mixed)
    one = [{**c, "setting": ""} for c in pool]
    assert [[c["seed"] for c in d] for d in draws(one, 3)] == [list(t) for t in itertools.combinations(range(7), 3)]


def test_mix_bench_takes_recorded_loss_lines_and_rejects_bad_ones():
    """`crossdomain_mix --line PAIR=SOURCE_ONLY,REFERENCE`: recorded lines for sweeps without source-only arms."""
    from vemscale.bench.crossdomain_mix import parse_lines

    assert parse_lines(["vnc_to_cdeep3m=0.12,0.49", "cdeep3m_to_vnc=0.059,0.726"]) == {
        "vnc_to_cdeep3m": (0.12, 0.49), "cdeep3m_to_vnc": (0.059, 0.726)}
    for bad, message in [("vnc_to_cdeep3m=0.12", "PAIR=SOURCE_ONLY,REFERENCE"),
                         ("vnc_to_cdeep3m", "PAIR=SOURCE_ONLY,REFERENCE"),
                         ("vnc_to_cdeep3m=0.5,0.4", "source-only < reference"),
                         ("vnc_to_cdeep3m=0.1,1.4", "source-only < reference")]:
        with pytest.raises(SystemExit, match=message):
            parse_lines([bad])
