"""Module buffers kept identical: rank 0's, every step, in the gradients' launch.

Role in the whole: a forward pass in training mode moves buffers
(BatchNorm's running mean, variance and batch count), each rank by its own
batch, so without a sync the replicas drift apart even though their
parameters stay equal.  DDP's answer (``broadcast_buffers=True``, its
default) is to broadcast rank 0's buffers before each forward; we do the
same in effect, with no extra round trip: beside the step's gradients, in
the same launch (:meth:`.process_group.ElasticProcessGroup.all_reduce_in_place`),
rank 0 contributes its buffers and every other rank zeros, so the sum is rank
0's values, bit for bit, in every dtype.  Why rank 0's and not an average:
an average would also touch buffers that never change (a positional table,
a mask) and round them differently every step; rank 0's is exact and is what
DDP users already have.

A step whose reduction failed must leave no trace here either: its forward
has already moved each rank's buffers by its own batch.  :meth:`restore`
puts back the values of the last committed step's sync (or of the last state
sync), so ranks that abort a step hold the same buffers again, as they hold
the same parameters.  Committed, not merely synced: a manual-optimization
batch may reduce twice, and if the second fails the whole batch is undone,
its first forward's statistics with it.
"""

from __future__ import annotations

import torch

__all__ = ["BufferSync"]


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if dtype is torch.bool else dtype  # gloo has no bool sum


class BufferSync:
    """Rank 0's buffers for every rank, one flat tensor per dtype."""

    def __init__(self) -> None:
        self._synced: list[torch.Tensor] | None = None  # flats of the last sync, as :meth:`_groups` orders them
        self._layout: tuple | None = None  # (dtype, shapes) per group of ``_synced``
        self._committed: tuple[list[torch.Tensor], tuple] | None = None  # what :meth:`restore` puts back

    @staticmethod
    def _groups(buffers: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        by: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for b in buffers:
            by.setdefault((b.device, b.dtype), []).append(b)
        return list(by.values())

    @staticmethod
    def _layout_of(groups: list[list[torch.Tensor]]) -> tuple:
        return tuple((g[0].dtype, tuple(tuple(b.shape) for b in g)) for g in groups)

    @staticmethod
    def _flat(group: list[torch.Tensor]) -> torch.Tensor:
        dtype = _wire_dtype(group[0].dtype)
        return torch.cat([b.detach().reshape(-1).to(dtype) for b in group])

    def outgoing(self, buffers: list[torch.Tensor], rank0: bool) -> list[torch.Tensor]:
        """Fresh flats to reduce with SUM: the buffers on rank 0, zeros elsewhere
        (never ``x * 0``: a NaN or an infinity would survive it)."""
        flats = [self._flat(g) for g in self._groups(buffers)]
        return flats if rank0 else [torch.zeros_like(f) for f in flats]

    def incoming(self, buffers: list[torch.Tensor], flats: list[torch.Tensor]) -> None:
        """The reduced flats (rank 0's buffers) into every buffer; kept as the last sync."""
        groups = self._groups(buffers)
        self._copy_into(groups, flats)
        self._synced, self._layout = flats, self._layout_of(groups)

    def commit(self) -> None:
        """The step of the last sync committed: its buffers are what a later failure restores."""
        if self._synced is not None:
            self._committed = (self._synced, self._layout)

    def snapshot(self, buffers: list[torch.Tensor]) -> None:
        """The current buffers are every replica's (after a state sync): keep them, committed."""
        groups = self._groups(buffers)
        self._synced, self._layout = [self._flat(g) for g in groups], self._layout_of(groups)
        self.commit()

    def restore(self, buffers: list[torch.Tensor]) -> bool:
        """The buffers of the last committed step back in place (a failed step); False if none fits."""
        groups = self._groups(buffers)
        if self._committed is None or self._committed[1] != self._layout_of(groups):
            return not buffers
        self._copy_into(groups, self._committed[0])
        return True

    @staticmethod
    def _copy_into(groups: list[list[torch.Tensor]], flats: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for group, flat in zip(groups, flats, strict=True):
                offset = 0
                for b in group:
                    n = b.numel()
                    b.copy_(flat[offset : offset + n].view(b.shape).to(b.dtype))
                    offset += n
