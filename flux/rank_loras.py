"""The request's LoRAs on every rank of a server on several GPUs: fused, kept and taken out on every rank alike.

Rank 0's slot (flux.lora.LoraSlot) and each worker's take the same use() calls: every `lora_use` command carries the
whole wanted state (these LoRAs, in this order, at these strengths; or none), the workers fuse while rank 0 does. A
use() that does not end alike on every rank is not a fault of the server. The common case is a cancel: coglet cancels
a prediction by raising CancelationException in its thread (coglet 0.23.1; replicate/cog
crates/coglet-python/src/cancel.rs: PyThreadState_SetAsyncExc), which can land anywhere in rank 0's read or fuse,
seconds long for a cold LoRA, while the workers finish theirs. Such a use() raises (the request fails or is canceled),
so no transformer call runs before the next use(); that one first gives every rank its original weights back, whatever
rank 0's slot was doing when it was interrupted (half a fuse, half a restore), and then fuses afresh on every rank:
the ranks agree again without a restart. The same holds when one rank refuses a file that another took (a file read
differently on two ranks): the request fails with an error naming lora_weights (and the rank, when a worker refused),
the server stays healthy, and the next use() re-syncs every rank. A restart would buy nothing more: nothing else
differs between the ranks, and whatever made them read the file differently would be there after it too. A file that
every rank refuses (an unusable LoRA: each slot refuses before changing anything) leaves the ranks in step, and the
LoRAs fused before stay warm. A worker that fails in any other way exits, which is a fault (flux.ranks' monitor).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flux import clock
from flux.errors import InvalidInputError
from flux.lora import INPUT, LoraRequest, LoraSlot, LoraUse

if TYPE_CHECKING:
    from flux.ranks import Ranks

logger = logging.getLogger(__name__)

OUT_OF_STEP = "context parallel: the LoRAs' use did not finish alike on every rank"


class RankLoras:
    """The LoRA slot of every rank, in place of rank 0's own (KontextEditor.lora): each use() goes to the workers'
    slots too, at the same time as rank 0's, so every rank keeps the same LoRAs fused (or the original weights).
    The LoraRequests go to the workers as they are: paths on this machine."""

    def __init__(self, ranks: Ranks, local: LoraSlot):
        self.ranks = ranks
        self.local = local
        # Every rank's weights are what its slot says they are: the last use() or restore() ended alike everywhere.
        self.in_step = True

    def check_supported(self) -> None:
        self.local.check_supported()

    def use(self, loras: Sequence[LoraRequest]) -> LoraUse:
        """LoraSlot.use on every rank. After a use() that did not end alike on every rank, every rank's original
        weights come back first (`seconds["lora_resync"]`), so the LoRAs are then fused afresh everywhere."""
        ranks, loras = self.ranks, tuple(loras)
        if loras:
            self.local.check_supported()  # refused before any worker is told
        ranks.check()
        seconds = {}
        if not self.in_step:
            t0 = clock.now(self.local.transformer.device)
            self.restore()
            seconds["lora_resync"] = clock.now(self.local.transformer.device) - t0
        self.in_step = False  # until every rank has ended this use() alike
        sent = ranks._executor.submit(ranks._command, "lora_use", (loras,))
        try:
            try:
                used = self.local.use(loras)
            except InvalidInputError:
                # Refused on every rank (each slot refuses before changing anything): no rank's weights changed.
                self.in_step = len(ranks._result(sent)) == len(ranks.workers)
                raise
            except BaseException:
                ranks._result(sent)  # the workers' command ends first, whatever happened here
                raise
            if errors := ranks._result(sent):
                raise InvalidInputError(INPUT, f"could not be fused on every rank: {'; '.join(errors)}")
            self.in_step = True
        except BaseException as e:
            if not self.in_step and ranks.fault is None:
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                logger.warning("%s (%s): every rank restores its original weights at the next use", OUT_OF_STEP, why)
            raise
        return LoraUse(used.reused, {**seconds, **used.seconds})

    def restore(self) -> None:
        """The original weights back on every rank."""
        self.in_step = False
        self.local.restore()
        if self.ranks.fault is None:
            self.ranks._result(self.ranks._executor.submit(self.ranks._command, "lora_restore", ()))
        self.in_step = True
