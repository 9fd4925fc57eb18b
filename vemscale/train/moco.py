"""MoCoV2 (He et al. 2020; Chen et al. 2020), the CEM500K paper's pre-training, around any model's encoder.

Query encoder = `model.encode(x)`, global average pooled, then an MLP projection head; the key encoder is a
momentum copy. Keys of past batches fill a queue of negatives; the loss is InfoNCE. Under DDP the keys are
gathered from all ranks before they enter the queue and, as in the reference code, the key encoder's batch
is shuffled across ranks so BatchNorm statistics cannot leak which samples are positives (with one worker
there is nothing to shuffle across).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vemscale.config import Strict


class MocoConfig(Strict):
    """MoCoV2 hyperparameters (defaults: the MoCoV2 / CEM500K values)."""

    dim: int = Field(128, gt=0)  # projection size
    hidden: int = Field(2048, gt=0)  # MLP hidden width
    queue: int = Field(65536, gt=0)  # negatives kept; must be a multiple of the global batch
    momentum: float = Field(0.999, ge=0, lt=1)  # key encoder EMA
    temperature: float = Field(0.2, gt=0)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank (no gradient)."""
    _, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class PooledEncoder(nn.Module):
    """model.encode(x), global average pooled, through a 2-layer MLP projection head."""

    def __init__(self, model: nn.Module, dim: int, hidden: int) -> None:
        super().__init__()
        self.model = model
        c = int(model.encode_channels)
        self.head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.encode(x).mean(dim=(2, 3)))


class MoCo(nn.Module):
    """Momentum contrast over a segmentation model's encoder; forward(view_q, view_k) -> (loss, top-1 acc).

    The decoder is not part of the objective: its parameters are set to requires_grad=False (so DDP
    without find_unused_parameters works), and the checkpointed model keeps its initial decoder.
    """

    def __init__(self, model: nn.Module, cfg: MocoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        encoder = set(model.parameter_groups()["encoder"])
        for name, p in model.named_parameters():
            p.requires_grad_(name in encoder)
        self.encoder_q = PooledEncoder(model, cfg.dim, cfg.hidden)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for name in ("decoder", "head"):  # the key encoder is the encoder only: no copy of the decoder to carry
            if hasattr(self.encoder_k.model, name):
                setattr(self.encoder_k.model, name, nn.Identity())
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.dim, cfg.queue), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def model(self) -> nn.Module:
        """The segmentation model whose encoder is being trained (what the checkpoint stores)."""
        return self.encoder_q.model

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.cfg.momentum
        query = dict(self.encoder_q.named_parameters())
        for name, pk in self.encoder_k.named_parameters():
            pk.mul_(m).add_(query[name].detach(), alpha=1 - m)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        keys = gather(keys)
        n, k = keys.shape[0], self.queue.shape[1]
        ptr = int(self.queue_ptr)
        if k % n:
            raise ValueError(f"MoCo queue {k} must be a multiple of the global batch {n}")
        self.queue[:, ptr : ptr + n] = keys.T
        self.queue_ptr[0] = (ptr + n) % k

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key features, computed on a batch shuffled across ranks (shuffle-BN) and unshuffled after."""
        rank, world = _world()
        if world == 1:
            return F.normalize(self.encoder_k(x), dim=1)
        b = x.shape[0]
        x_all = gather(x)
        idx = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(idx, src=0)
        k = F.normalize(self.encoder_k(x_all[idx.view(world, -1)[rank]]), dim=1)
        k_all = gather(k)
        unshuffle = torch.argsort(idx)
        return k_all[unshuffle.view(world, -1)[rank]][:b]

    def forward(self, view_q: torch.Tensor, view_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(view_q), dim=1)
        with torch.no_grad():
            self._momentum_update()
            k = self._keys(view_k)
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ self.queue.clone().detach()
        logits = torch.cat([pos, neg], dim=1) / self.cfg.temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(dim=1) == 0).float().mean()
        self._enqueue(k)
        return loss, acc.detach()
