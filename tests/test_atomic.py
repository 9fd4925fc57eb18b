"""Atomic writes: a failed write leaves the previous file and no temporary, and no stage writes a local file
any other way (so a kill never leaves half a summary, state, config, table or figure for a rerun to read)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT
from vemscale.io.atomic import save_figure, write_bytes, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_text(path, '{"blocks": 4}')
    with pytest.raises(UnicodeEncodeError):
        write_text(path, '{"blocks": "\ud800"}')  # a lone surrogate cannot be encoded: fails mid-write
    with pytest.raises(TypeError):
        write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == '{"blocks": 4}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    write_bytes(path, b"{}")
    assert path.read_bytes() == b"{}"


def test_figures_are_written_whole(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "plot.png", dpi=50)
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


# writes that are whole by construction: inside a temporary checkpoint directory renamed as a whole, or into
# an in-memory buffer handed to vemscale.io.atomic
ALLOWED = re.compile(r"tmp / |\(buf|savefig\(buf|open\(path, \"ab\+\"\)")


def test_no_stage_writes_a_local_file_around_the_atomic_helpers():
    pattern = re.compile(r"\.write_text\(|\.write_bytes\(|\.savefig\(|np\.save\(|torch\.save\(|open\([^)]*['\"][wa]b?['\"]|\.to_csv\(")
    offenders = []
    for f in sorted((ROOT / "vemscale").rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith("vemscale/bench/") or rel == "vemscale/io/atomic.py":
            continue  # benchmarks write their own scratch; the helpers themselves
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line) and not ALLOWED.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "write through vemscale.io.atomic:\n" + "\n".join(offenders)


def test_an_append_only_log_survives_a_line_cut_by_a_kill(tmp_path):
    from vemscale.io.atomic import append_line, read_json_lines

    log = tmp_path / "attempts.jsonl"
    append_line(log, '{"event": "start"}')
    with open(log, "ab") as f:
        f.write(b'{"event": "en')  # what a kill in the middle of an append leaves
    append_line(log, '{"event": "start", "n": 2}')
    assert read_json_lines(log) == [{"event": "start"}, {"event": "start", "n": 2}]
