"""Rank 0's LoRAs on a server on several GPUs (flux.rank_loras) after a cancel anywhere in their use, without the
server: rank 0 alone (a Ranks without workers, whose commands reach none), the tiny model, real LoRA files. The
server with both ranks: tests/test_server_parallel.py."""

import contextlib
import copy
import ctypes
import sys
import threading
from collections.abc import Iterator

import torch
from coglet import CancelationException

from flux import lora
from flux.lora import LoraRequest, LoraSlot
from flux.optimize import AccelerationConfig
from flux.parallel import ParallelSettings
from flux.rank_loras import RankLoras
from flux.ranks import Ranks
from flux.tiny import SyntheticConfig, build_pipeline, write_tiny_lora

STRIDE = 3
"""Every third line of flux/lora.py that a use() runs is a point to cancel at (all of them take about 3x longer)."""


@contextlib.contextmanager
def cancel_at_line(k: int) -> Iterator[list[int]]:
    """Count the lines of flux/lora.py (its comprehensions' aside) this thread runs; at the k-th, raise coglet's
    CancelationException in this thread as coglet's cancel does (coglet 0.23.1; replicate/cog
    crates/coglet-python/src/cancel.rs: PyThreadState_SetAsyncExc), so that it lands at the interpreter's next check,
    wherever that is. Yields the count so far (k=0: never raised)."""
    seen = [0]

    def each_line(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if seen[0] == k:
                thread = ctypes.c_ulong(threading.get_ident())
                ctypes.pythonapi.PyThreadState_SetAsyncExc(thread, ctypes.py_object(CancelationException))
        return each_line

    def each_call(frame, event, arg):
        code = frame.f_code
        return each_line if code.co_filename == lora.__file__ and not code.co_name.startswith("<") else None

    before = sys.gettrace()  # a coverage tool's tracer, if one runs
    sys.settrace(each_call)
    try:
        yield seen
    finally:
        sys.settrace(before)


def test_a_use_cancelled_at_any_line_on_rank_0_is_redone_in_full_at_the_next_use(tmp_path):
    """A request for LoRA y, cancelled while rank 0 reads y, takes out the warm LoRA x, or fuses y: the next
    requests for x and for none get exactly the weights of a slot that never saw y (rank 0's slot may believe x is
    still fused while half of x's layers have their original weights back)."""
    cfg = SyntheticConfig(num_attention_heads=2)
    x = (LoraRequest(write_tiny_lora(tmp_path / "x", seed=1, cfg=cfg)),)
    y = (LoraRequest(write_tiny_lora(tmp_path / "y", seed=2, cfg=cfg), 0.5),)
    transformer = build_pipeline(cfg).transformer
    original = copy.deepcopy(transformer.state_dict())
    LoraSlot(transformer).use(x)
    with_x = copy.deepcopy(transformer.state_dict())
    ranks = Ranks(ParallelSettings(), tmp_path, torch.device("cpu"), torch.float32, AccelerationConfig(), None)

    def cancelled(k: int) -> tuple[RankLoras, int, bool]:
        """A fresh rank 0 with x fused, then a use of y cancelled at line k: (its LoRAs, lines seen, cancelled)."""
        transformer.load_state_dict(original)
        loras = RankLoras(ranks, LoraSlot(transformer))
        loras.use(x)
        with cancel_at_line(k) as seen:
            try:
                loras.use(y)
                for _ in range(2):  # where a cancel raised on the last line would land
                    pass
            except CancelationException:
                return loras, seen[0], True
        return loras, seen[0], False

    def holds(weights: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(value, weights[name]) for name, value in transformer.state_dict().items())

    _, lines, _ = cancelled(0)
    wrong = []
    for k in range(1, lines + 1, STRIDE):
        loras, _, landed = cancelled(k)
        assert landed, f"the cancel raised at line {k} of {lines} did not land"
        loras.use(x)
        fused_x = holds(with_x)
        loras.use(())
        if not (fused_x and holds(original)):
            wrong.append(k)
    ranks.close()
    print(f"cancelled at {len(range(1, lines + 1, STRIDE))} of the {lines} lines of flux/lora.py a use runs")
    assert wrong == [], f"the weights were wrong after a cancel at these of {lines} lines: {wrong}"
