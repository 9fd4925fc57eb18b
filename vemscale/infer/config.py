"""`InferConfig`, the keys of `vemscale infer`, apart from the pipeline so that a bad key or value fails in a second,
before torch, the model or Ray are imported."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from vemscale.config import PositiveTriple, StageConfig
from vemscale.io.shards import ShardKeys


class InferConfig(StageConfig, ShardKeys):
    """`vemscale infer`: predict a volume blockwise with a checkpoint."""

    input: str = Field(description="volume URL (zarr, OME-Zarr, n5, precomputed, tiff...; local or s3/gs)")
    output: str = Field(description="output directory/URL (OME-Zarr group; precomputed://... for precomputed)")
    checkpoint: str = Field(description="vemscale checkpoint directory (local path, or s3:// gs:// URL)")
    scale: int | str | None = None  # multiscale level of the input (OME-Zarr index/path); None = finest
    block_shape: tuple[int, int, int] = (16, 768, 768)  # z,y,x block core; whole output chunks (768 = 4 tile cores of 192)
    halo: Literal["auto"] | tuple[int, int, int] = "auto"  # z,y,x context read with each block; auto = what tiles read
    output_chunks: tuple[int, int, int] = (16, 128, 128)  # z,y,x storage chunks of the outputs
    roi: str | None = None  # z0:z1,y0:y1,x0:x1 (aligned outwards to output chunks); None = whole volume
    mode: Literal["xy", "orthoplane"] = "xy"
    write: Literal["labels", "probabilities", "both"] = "both"
    workers: Literal["auto"] | int = "auto"  # actors (one model each); auto: one per GPU, else CPUs // threads
    threads_per_worker: int = Field(1, ge=1)  # torch threads (and Ray CPUs) per actor
    batch_size: int = Field(8, ge=1)  # 2D tiles per forward pass (tiles of several blocks share a batch)
    read_tasks: int = Field(2, ge=1)  # read tasks at once (block + halo from the input)
    write_tasks: int = Field(2, ge=1)  # write tasks at once
    io_cpus: Literal["auto"] | float = "auto"  # Ray CPUs per read/write task; auto: 0 when the actors take every CPU
    blocks_per_batch: Literal["auto"] | int = "auto"  # block ids per Ray Data block; auto: ~16 MiB, >= 4 per actor
    num_gpus_per_worker: Literal["auto"] | float = "auto"  # auto: 1 when the cluster has GPUs, else 0
    mask: str | None = None  # tissue mask: a volume URL (non-zero = compute, any scale), or "auto"; None = everything
    mask_scale: int | str | None = None  # scale of the mask volume; with mask=auto, the input scale the mask is made from
    mask_cell: PositiveTriple = (4, 32, 32)  # mask=auto: z,y,x voxels (of mask_scale) per mask cell
    mask_min_std: float = Field(2.0, ge=0)  # mask=auto: tissue when a cell's 4x4-pooled std >= this (0-255 scale)
    mask_dilate: int = Field(1, ge=0)  # mask=auto: grow tissue by this many cells
    # histogram matching of the input to a reference (vemscale.io.histogram): "checkpoint" (the histogram of the
    # images the model was trained on), a reference volume URL, or a histogram .json; None = the raw grey values
    match_histogram: str | None = None
    # test-time augmentation (vemscale.infer.tta): 1 = none, 8 = mean over 4 rotations x flip (8x the forward
    # passes); None = what the checkpoint was validated with
    tta: Literal[1, 8] | None = None
    overwrite: bool = False  # replace an existing output (and its ledger) instead of resuming
    progress: bool = True  # a progress bar over blocks on stderr

    @field_validator("roi", mode="before")
    @classmethod
    def _roi_text(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            if not all(isinstance(p, str) for p in v):
                raise ValueError("roi must be a string 'z0:z1,y0:y1,x0:x1' (quote it in YAML)")
            return ",".join(v)
        return v

    @field_validator("workers")
    @classmethod
    def _workers_positive(cls, v: Any) -> Any:
        if v != "auto" and v < 1:
            raise ValueError("workers must be 'auto' or a positive integer")
        return v

    @field_validator("halo")
    @classmethod
    def _halo_non_negative(cls, v: Any) -> Any:
        if v != "auto" and min(v) < 0:
            raise ValueError("halo must be 'auto' or three non-negative integers z,y,x")
        return v
