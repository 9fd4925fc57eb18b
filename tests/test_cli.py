"""The command line imports only the stage it runs, and a stage whose module cannot be imported fails loudly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


def test_help_lists_every_stage_without_importing_them():
    code = ("import sys; from vemscale.cli import STAGES, build_parser; p = build_parser(''); "
            "h = p.format_help(); print(all(s in h for s in STAGES), 'torch' in sys.modules, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False", "False"]


def test_a_stage_that_cannot_be_imported_fails_loudly(monkeypatch):
    from vemscale import cli

    monkeypatch.setitem(cli.STAGES, "broken", ("vemscale.no_such_stage", "a stage whose module is missing"))
    assert "broken" in cli.build_parser("").format_help()  # listed, never silently dropped
    with pytest.raises(ModuleNotFoundError, match="vemscale.no_such_stage"):
        cli.main(["broken"])


def test_a_bad_infer_key_fails_before_torch_or_ray_are_imported():
    """A typo in `vemscale infer` (or a `ray job submit` of jobs/infer.py) is reported in about a second."""
    code = ("import sys; from vemscale.cli import main; "
            "rc = main(['infer', 'input=x', 'output=y', 'checkpoint=z', 'blokc_shape=2,64,64']); "
            "print(rc, 'torch' in sys.modules, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "unknown config key 'blokc_shape'" in r.stderr and "block_shape" in r.stderr
    assert r.stdout.split() == ["2", "False", "False"]
