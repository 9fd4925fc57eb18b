"""A training run's metrics.csv: read it, rewrite it atomically, and the driver-side Ray Train callback that
appends rank 0's reports to it (fine-tuning and pre-training share it)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.csv as dicts of strings; [] when it does not exist yet."""
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def write_metrics(path: Path, rows: list[dict], cols: list[str]) -> None:
    """Replace the file in one rename, so a reader (or a kill) never sees half a table."""
    import io

    from vemscale.io.atomic import write_text

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def metrics_logger(run_dir: Path, columns: list[str], on_report: Callable[[dict[str, Any]], None]):
    """A Ray Train callback: each report of rank 0 becomes a row of run_dir/metrics.csv (`columns` first, any other
    keys after them), then `on_report(metrics)` draws and prints. A resumed run first drops the rows logged after
    the checkpoint it restarts from, since it reports those iterations again."""
    from ray.train import UserCallback

    class MetricsLogger(UserCallback):
        def __init__(self) -> None:
            self.path = run_dir / "metrics.csv"
            self.first = True

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = metrics[0]
            rows = read_metrics(self.path)
            if self.first:
                rows = [r for r in rows if float(r["iteration"]) <= m["resumed_from"]]
                self.first = False
                if m["resumed_from"]:
                    print(f"[vemscale] resumed from the checkpoint at iteration {m['resumed_from']}", flush=True)
            # every column any row has (a report without validation must not drop the validation columns)
            cols = list(dict.fromkeys(columns + (list(rows[0]) if rows else []) + sorted(k for k in m if k not in columns)))
            rows = [r for r in rows if float(r["iteration"]) != m["iteration"]]  # a finished run reports its last again
            rows.append({c: m.get(c, "") for c in cols})
            write_metrics(self.path, rows, cols)
            on_report(m)

    return MetricsLogger()
