"""Blockwise inference over volumes of any size.

- `tiling`: 2D tiles on a global grid (xy and orthoplane), so predictions never depend on the blocks;
- `plan`: the block grid over an ROI, block index -> box, chunk alignment;
- `ledger`: done-markers next to the output, keyed by what determines the output bytes;
- `outputs`: the OME-Zarr / precomputed layers (probabilities, labels) and how a block is written;
- `predictor`: one block read -> predicted -> written -> marked; the Ray Data actor around it;
- `pipeline`: `InferConfig` and `run_infer` (validation, the actor pool, the summary);
- `run`: `vemscale infer` and `jobs/infer.py`.
"""
