"""The request's LoRAs on every rank of a server on several GPUs: fused, kept and taken out on every rank alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from flux.lora import LoraRequest, LoraSlot, LoraUse

if TYPE_CHECKING:
    from flux.ranks import Ranks


class RankLoras:
    """The LoRA slot of every rank, in place of rank 0's own (KontextEditor.lora): each use() goes to the workers'
    slots too, at the same time as rank 0's, so every rank keeps the same LoRAs fused (or the original weights).
    The LoraRequests go to the workers as they are: paths on this machine."""

    def __init__(self, ranks: Ranks, local: LoraSlot):
        self.ranks = ranks
        self.local = local

    def check_supported(self) -> None:
        self.local.check_supported()

    def use(self, loras: Sequence[LoraRequest]) -> LoraUse:
        ranks, loras = self.ranks, tuple(loras)
        if loras:
            self.local.check_supported()  # refused before any worker is told
        ranks.check()
        sent = ranks._executor.submit(ranks._command, "lora_use", (loras,))
        try:
            used = self.local.use(loras)
        except BaseException:
            errors = ranks._result(sent)  # the workers' answer first
            if not errors and ranks.fault is None:
                # Rank 0 refused what the workers took (a LoraSlot refuses before changing anything): the ranks'
                # weights would differ from here on.
                ranks._break("rank 0 could not fuse LoRAs that the other ranks fused")
            raise
        errors = ranks._result(sent)
        if errors:
            ranks._break(f"LoRAs that rank 0 fused failed on {'; '.join(errors)}")
            ranks.check()
        return used

    def restore(self) -> None:
        self.local.restore()
        if self.ranks.fault is None:
            self.ranks._result(self.ranks._executor.submit(self.ranks._command, "lora_restore", ()))
