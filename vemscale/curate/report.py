"""The curation report: counts per source and reason, and mosaics of kept and dropped patches (PNG)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorstore as ts

from vemscale.curate.tasks import png_bytes, read_parquet, read_png

MOSAIC = 64  # patches per mosaic
TILE = 112  # pixels per patch in a mosaic


def mosaic(images: list[np.ndarray], columns: int = 8, cell: tuple[int, int] = (TILE, TILE)) -> np.ndarray:
    """Patches (any size) resized into a grid of cells (h, w) with 2-pixel gaps (white background)."""
    from vemscale.curate.patches import resample

    ch, cw = cell
    rows = max(1, -(-len(images) // columns))
    out = np.full((rows * (ch + 2) + 2, columns * (cw + 2) + 2), 255, np.uint8)
    for i, img in enumerate(images):
        h, w = img.shape
        f = min(ch / h, cw / w)
        small = resample(img, (max(1, int(h * f)), max(1, int(w * f))))
        r, c = divmod(i, columns)
        y, x = 2 + r * (ch + 2), 2 + c * (cw + 2)
        out[y : y + small.shape[0], x : x + small.shape[1]] = small
    return out


def _keys(kv: ts.KvStore, prefix: str, limit: int) -> list[str]:
    names = kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()
    return sorted(bytes(n).decode() for n in names)[:limit]


def write_report(kv: ts.KvStore, plans: list[dict[str, Any]], counts: dict[str, dict[str, int]],
                 seed: int) -> dict[str, Any]:
    """`report/summary.json`, `report/kept.png` and `report/dropped_<reason>.png`; returns the summary."""
    total_tasks = sum(p["tasks"] for p in plans)
    rng = np.random.default_rng([seed, 5])
    picks = sorted(rng.choice(total_tasks, size=min(total_tasks, 16), replace=False).tolist())
    kept: list[np.ndarray] = []
    for t in picks:  # a few patches of up to 16 tasks spread over the corpus
        table = read_parquet(kv, f"manifest/part-{t:09d}.parquet", ["kept", "path"])
        paths = [p for k, p in zip(table.column("kept").to_pylist(), table.column("path").to_pylist()) if k]
        for p in paths[: max(1, MOSAIC // len(picks))]:
            res = kv.read(p).result()
            if res.state == "value":
                kept.append(read_png(bytes(res.value)))
    mosaics = {}
    if kept:
        kv.write("report/kept.png", png_bytes(mosaic(kept[:MOSAIC]))).result()
        mosaics["kept"] = "report/kept.png"
    reasons = sorted({r for c in counts.values() for r in c if r != "kept"})
    for why in reasons:
        keys = _keys(kv, f"report/examples/{why}/", MOSAIC)
        imgs = [read_png(bytes(kv.read(k).result().value)) for k in keys]
        if imgs:
            name = f"report/dropped_{why}.png"
            pairs = why == "duplicate"  # a duplicate beside the patch kept for it
            kv.write(name, png_bytes(mosaic(imgs, columns=4 if pairs else 8,
                                            cell=(TILE, 2 * TILE + 4) if pairs else (TILE, TILE)))).result()
            mosaics[f"dropped_{why}"] = name
    totals: dict[str, int] = {}
    for c in counts.values():
        for k, v in c.items():
            totals[k] = totals.get(k, 0) + v
    summary = {"per_source": counts, "total": totals, "drawn": sum(totals.values()), "kept": totals.get("kept", 0),
               "mosaics": mosaics}
    kv.write("report/summary.json", json.dumps(summary, indent=2).encode()).result()
    return summary
