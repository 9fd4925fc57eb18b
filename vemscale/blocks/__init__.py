"""The one block layer every volume-walking stage uses: a lazy grid of boxes, a done-ledger, one runner.

- `grid.BlockGrid`: block `i`'s box from `i` alone (never a list of boxes), chunk alignment, halos.
- `ledger.Ledger`: which blocks are done (with an optional per-block payload), resumable, O(1) to restart.
- `runner.run_blocks`: pending ids -> staged Ray Data pipeline (tasks and actor pools) -> marked done.
Stage code is a pure function of a block or a batch of blocks; Ray lives in the runner only.
"""

from vemscale.blocks.grid import AXES, BlockGrid, Box, box_shape, box_voxels, format_roi, parse_roi
from vemscale.blocks.ledger import LEDGER_DIR, Ledger, fingerprint, ledger_url

__all__ = ["AXES", "BlockGrid", "Box", "box_shape", "box_voxels", "format_roi", "parse_roi", "LEDGER_DIR", "Ledger",
           "fingerprint", "ledger_url"]
