"""A GPU rehearsal on the CPU: the full-size FLUX.1 Kontext model in bfloat16 on a fake CUDA device runs whole
edits through the serving code (flux.pipeline.KontextEditor), with no memory and no compute.

    python -m measure.rehearsal                        # 0.25 / 1 / 2 MP: the estimates in docs/benchmarks.md
    python -m measure.rehearsal --megapixels 1 --steps 28

torch's FakeTensorMode gives every tensor a device, a dtype and a shape and no data: the ~17B parameters
cost nothing, and every op runs its shape logic only. The serving code runs as it is, op by op, and each op is
checked as it is dispatched (a violation stops the run with an error that names the op and where it ran):

- device: inside the denoise loop every op runs on the GPU, on GPU tensors only (a CPU op or tensor there means
  host work or a host round trip every step on a real GPU, or a device-mismatch error there);
- host syncs: nothing inside the denoise loop reads a value back (`.item()`, `bool(tensor)`, a copy to the
  CPU, `nonzero`): on a GPU each one stalls the queue of kernels until the GPU catches up;
- dtype: every matmul-class op (linear, matmul, attention, convolution), in or out of the loop, runs on the
  GPU in the model's dtype (a float32 upcast doubles its time and memory).

What it counts: the FLOPs of each transformer call (matmuls and attention, as measure.floors.transformer_flops
counts them; the two must agree), and the live tensor bytes after every op (each fresh storage from its
allocation until it is freed), whose peak is a GPU memory estimate. It leaves out what no tensor shows: the
CUDA context and the libraries' workspaces (cuBLAS, cuDNN; about 1 GiB together), the caching allocator's
rounding and fragmentation (torch.cuda.max_memory_reserved runs above the allocated peak), scratch memory inside
kernels (flash and cuDNN attention keep only their output and log-sum-exp; the math fallback would hold the
S × S scores), what torch.compile changes (fused kernels keep fewer intermediates; CUDA graphs keep their own
pool), fp8 weights, the safety checker (~0.9 GB in float16) and LoRA originals kept on the GPU.

Host work on host tensors (decoding and resizing the input, the seeded noise, position ids) runs for real, since
its values steer what follows; a host tensor becomes a fake GPU one where it is copied to the GPU. Host reads of
GPU tensors outside the loop are allowed and counted (the clock's waits between phases, the finite check after
the loop, the copy of the picture to the host): a fake tensor has no values, so they read as placeholders (True,
zeros) and the picture is black.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from flux import sampling
from flux.model import FluxComponents
from flux.pipeline import EditRequest, KontextEditor
from flux.taylor_seer_utils import AccelerationLevel
from flux.tiny import FULL, SyntheticConfig, build_pipeline
from measure import floors, timing

GIB = 2**30
_GPU = torch.device("cuda", 0)
_META = torch.device("meta")
_LOOP = sampling.denoise.__code__
_PHASES = {
    KontextEditor.encode_prompt.__wrapped__.__code__: "text",
    KontextEditor.encode_image.__wrapped__.__code__: "image",
    _LOOP: "denoise",
    KontextEditor.decode.__wrapped__.__code__: "decode",
}
MODELS = ("transformer", "text_encoder", "text_encoder_2", "vae")

_aten = torch.ops.aten
_MATMULS = {_aten.linear.default, _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
_MATMULS |= {_aten.matmul.default}
_ATTENTION = {
    _aten.scaled_dot_product_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}
_CONVOLUTIONS = {_aten.convolution.default, _aten.conv2d.default}
# Ops that read values back to the host; outside the loop, all but nonzero read as a placeholder.
_SCALAR_READS = {_aten._local_scalar_dense.default, _aten.item.default, _aten.is_nonzero.default}
_SCALAR_READS |= {_aten.equal.default, _aten.allclose.default}
_HOST_READS = _SCALAR_READS | {_aten.nonzero.default}


class Violation(AssertionError):
    """An op the rehearsal refuses: the message names the op, its tensors and where it ran."""


@dataclass
class CallFlops:
    """What one transformer call computed, counted op by op."""

    matmul: float = 0.0
    attention: float = 0.0


@dataclass
class Report:
    """One rehearsed edit."""

    size: tuple[int, int]
    steps: int
    level: str
    calls: list[CallFlops] = field(default_factory=list)
    ops: int = 0  # ops checked
    loop_ops: int = 0  # of which inside the denoise loop
    host_reads: list[str] = field(default_factory=list)  # outside the loop, in order
    weight_bytes: int = 0  # live after the model was placed on the GPU
    peak_bytes: int = 0  # the peak of live GPU tensor bytes over the whole edit
    phase_peaks: dict[str, int] = field(default_factory=dict)  # the peak in each phase: text, image, denoise, decode
    seconds: float = 0.0  # wall time of the rehearsal itself (CPU)

    def summary(self) -> str:
        w, h = self.size
        phases = ", ".join(f"{name} {n / GIB:.2f}" for name, n in self.phase_peaks.items())
        return (
            f"{w}x{h}, {self.steps} steps, {self.level}: {len(self.calls)} transformer calls, "
            f"peak {self.peak_bytes / GIB:.2f} GiB of live GPU tensors ({self.weight_bytes / GIB:.2f} GiB weights; "
            f"{phases}), {self.ops} ops checked ({self.loop_ops} in the loop), "
            f"{len(self.host_reads)} host reads outside the loop, {self.seconds:.0f} s on this CPU"
        )


def _fakes(tree) -> list[FakeTensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, FakeTensor)]


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.uint8: np.uint8, torch.bool: np.bool_}
# Tensor methods whose C++ bindings open a device guard.
_GUARDED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.contiguous, torch.Tensor.item}
_GUARDED |= {torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.tolist}


class _FakeCudaShim(TorchFunctionMode):
    """What a fake CUDA tensor needs on a torch built without CUDA.

    Python indexing (`x[:, None]`, `x[idx] = y`), `contiguous()` and reading a value (`item()`, `float()`)
    open a CUDA device guard in C++, which a CPU build does not have: the fake tensors take the meta device
    for the length of such a call (the shapes are the same). Reading a fake tensor's values into numpy (the
    picture's one copy to the host) gives zeros of its shape.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GUARDED:
            on_gpu = [t for t in _fakes((args, kwargs)) if t.fake_device.type == "cuda"]
            if on_gpu:
                saved = [(t, t.fake_device) for t in on_gpu]
                for t in on_gpu:
                    t.fake_device = _META
                try:
                    out = func(*args, **kwargs)
                finally:
                    for t, device in saved:
                        t.fake_device = device
                for t in _fakes(out):
                    if t.fake_device == _META:
                        t.fake_device = saved[0][1]
                return out
        if func is torch.Tensor.numpy and isinstance(args[0], FakeTensor):
            t = args[0]
            return np.zeros(tuple(t.shape), dtype=_NUMPY[t.dtype])
        return func(*args, **kwargs)


class _Watch(TorchDispatchMode):
    """Checks and counts every op the edit dispatches (see the module's docstring)."""

    def __init__(self, fake: FakeTensorMode, dtype: torch.dtype):
        super().__init__()
        self.fake, self.dtype = fake, dtype
        self.report: Report | None = None
        self.call: CallFlops | None = None  # the transformer call in progress
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "prim":
            return func(*args, **kwargs)
        in_loop = _in_denoise_loop()
        tensors = _tensors((args, kwargs))
        if self.report is not None:
            self.report.ops += 1
            self.report.loop_ops += in_loop
        if in_loop and any(_device(t).type == "cpu" for t in tensors):
            raise Violation(f"a CPU tensor inside the denoise loop: {func} on {_describe(tensors)}")
        if not _touches_gpu(args, kwargs, tensors):
            if in_loop:
                raise Violation(f"a CPU op inside the denoise loop: {func} on {_describe(tensors) or 'no tensors'}")
            # Host work on host tensors (image preprocessing, the seeded noise, position ids) runs for real:
            # its values steer what follows, and none of it is GPU memory.
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        # Host tensors going to the GPU (a copy, or an operand beside a GPU tensor) become fake there.
        args, kwargs = tree_map_only(torch.Tensor, self._faked, (args, kwargs))
        tensors = _tensors((args, kwargs))
        if func in _HOST_READS:
            if in_loop:
                raise Violation(f"host sync inside the denoise loop: {func} on {_describe(tensors)}")
            self._host_read(str(func))
            if func in _SCALAR_READS:
                return _placeholder(func, tensors[0].dtype)
        if func in _MATMULS or func in _ATTENTION or func in _CONVOLUTIONS:
            wrong = [t for t in tensors if _device(t).type != "cuda" or t.dtype != self.dtype]
            if wrong:
                raise Violation(
                    f"{func} runs on {_describe(wrong)}, not on the GPU in {self.dtype} ({_phase()}), "
                    f"with {_describe(tensors)}"
                )
            if self.call is not None:
                self._count(func, args)
        out = _on_meta(func, args, kwargs, tensors)
        if any(_device(t).type == "cuda" for t in tensors) and any(_device(t).type == "cpu" for t in _tensors(out)):
            if in_loop:
                raise Violation(f"a copy to the host inside the denoise loop: {func} on {_describe(tensors)}")
            self._host_read(f"{func} to the host")
        self._track(func, out)
        return out

    def _faked(self, t: torch.Tensor) -> torch.Tensor:
        return t if isinstance(t, FakeTensor) else self.fake.from_tensor(t)

    def _host_read(self, what: str) -> None:
        if self.report is not None:
            self.report.host_reads.append(what)

    def synchronize(self, device=None) -> None:
        if _in_denoise_loop():
            raise Violation("host sync inside the denoise loop: torch.cuda.synchronize")
        self._host_read("torch.cuda.synchronize")

    def _count(self, func, args) -> None:
        if func in _ATTENTION:
            q, k, v = args[:3]  # (B, H, S, D)
            b, h, s_q, d = q.shape
            self.call.attention += 2 * b * h * s_q * k.shape[-2] * (d + v.shape[-1])
        elif func is _aten.linear.default:
            x, w = args[0], args[1]
            self.call.matmul += 2 * math.prod(x.shape[:-1]) * w.shape[0] * w.shape[1]
        elif func in (_aten.mm.default, _aten.addmm.default):
            a, b = args[-2], args[-1]
            self.call.matmul += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        else:  # bmm, baddbmm, matmul: batched
            a, b = args[-2], args[-1]
            self.call.matmul += 2 * math.prod(a.shape[:-1]) * a.shape[-1] * b.shape[-1]

    def _track(self, func, out) -> None:
        """Live GPU bytes: every output on the GPU with a storage of its own (not a view, not in place), from
        its op until it is freed."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        returns = func._schema.returns
        for i, t in enumerate(outs):
            if not isinstance(t, FakeTensor) or i >= len(returns) or returns[i].alias_info is not None:
                continue
            if t.fake_device.type != "cuda":
                continue
            storage = t.untyped_storage()
            n = storage.nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            if self.report is not None:
                phase = _phase()
                peaks = self.report.phase_peaks
                peaks[phase] = max(peaks.get(phase, 0), self.live)
            weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n


def _touches_gpu(args, kwargs, tensors: list[torch.Tensor]) -> bool:
    """Whether an op reads a fake GPU tensor or makes one (a factory or copy with device=cuda)."""
    if any(isinstance(t, FakeTensor) for t in tensors):
        return True
    return any(isinstance(a, torch.device) and a.type == "cuda" for a in tree_flatten((args, kwargs))[0])


def _on_meta(func, args, kwargs, tensors: list[torch.Tensor]):
    """`func` run by the fake mode with its fake GPU tensors on the meta device: its kernels (decompositions
    among them) may open a CUDA device guard, which a CPU build does not have. The outputs go back to the GPU."""
    on_gpu = [t for t in tensors if isinstance(t, FakeTensor) and t.fake_device.type == "cuda"]
    if not on_gpu:
        return func(*args, **kwargs)
    for t in on_gpu:
        t.fake_device = _META
    try:
        out = func(*args, **kwargs)
    finally:
        for t in on_gpu:
            t.fake_device = _GPU
    for t in _tensors(out):
        if isinstance(t, FakeTensor) and t.fake_device == _META:
            t.fake_device = _GPU
    return out


def _in_denoise_loop() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _LOOP:
            return True
        frame = frame.f_back
    return False


def _phase() -> str:
    """The edit's phase on the stack: text, image, denoise or decode."""
    frame = sys._getframe(2)
    while frame is not None:
        phase = _PHASES.get(frame.f_code)
        if phase:
            return phase
        frame = frame.f_back
    return "other"


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _device(t: torch.Tensor) -> torch.device:
    device = t.fake_device if isinstance(t, FakeTensor) else t.device
    return _GPU if device == _META else device  # meta: a fake GPU tensor inside an indexing call


def _describe(tensors: list[torch.Tensor]) -> str:
    return ", ".join(f"{_device(t).type} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}" for t in tensors[:4])


def _placeholder(func, dtype: torch.dtype):
    """What a host read of a fake tensor returns: True for the yes/no questions (the finite check after the
    loop passes), else a zero of the tensor's kind."""
    if func is not _aten._local_scalar_dense.default or dtype == torch.bool:
        return True
    return 0.0 if dtype.is_floating_point else 0


class FakeGpu:
    """The full-size model (or `config`'s) on a fake CUDA device, and the means to rehearse edits on it.

    Built on the meta device (no initialisation), then given fake CUDA storage: nothing is allocated. Use it
    as a context manager; edits run inside it."""

    def __init__(self, config: SyntheticConfig = FULL, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self._stack = ExitStack()
        self._fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.watch = _Watch(self._fake, dtype)
        pipe = build_pipeline(config, "meta", dtype)
        with self._modes():
            for name in MODELS:
                getattr(pipe, name).to_empty(device=_GPU)
        self.weight_bytes = self.watch.live
        self.components = FluxComponents.from_pipeline(pipe)
        self.editor = KontextEditor(self.components)

    @contextmanager
    def _modes(self) -> Iterator[None]:
        # torch.cuda.synchronize (flux.clock waits for the GPU between phases) is the one CUDA runtime call the
        # serving code makes; the fake GPU answers it at once, and it counts as a host sync.
        synchronize = torch.cuda.synchronize
        torch.cuda.synchronize = self.watch.synchronize
        try:
            with self._fake, _FakeCudaShim(), self.watch:
                yield
        finally:
            torch.cuda.synchronize = synchronize

    def rehearse(
        self,
        size: tuple[int, int] = (1024, 1024),
        steps: int = sampling.DEFAULT_STEPS,
        level: AccelerationLevel = AccelerationLevel.GO_REALLY_FAST,
        plant: Callable[[torch.nn.Module], Callable[[], None]] | None = None,
    ) -> Report:
        """One edit with output and context image of `size` (width, height), checked op by op.

        `plant` (for tests) is given the transformer and returns a function that undoes what it did."""
        transformer = self.components.transformer
        report = Report(size, steps, level.value)
        watch = self.watch

        def opened(*_) -> None:
            watch.call = CallFlops()

        def closed(*_) -> None:
            report.calls.append(watch.call)
            watch.call = None

        handles = [transformer.register_forward_pre_hook(opened), transformer.register_forward_hook(closed)]
        undo = plant(transformer) if plant else None
        image = timing.sample_image(*size)
        request = EditRequest(timing.PROMPT, image, num_inference_steps=steps, seed=0, acceleration=level)
        t0 = time.perf_counter()
        watch.report, watch.peak = report, watch.live
        try:
            with self._modes():
                result = self.editor.edit_at_size(request, size, size)
        finally:
            watch.report, watch.call = None, None
            for handle in handles:
                handle.remove()
            if undo:
                undo()
        assert result.transformer_calls == len(report.calls)
        report.weight_bytes = self.weight_bytes
        report.peak_bytes = watch.peak
        report.seconds = time.perf_counter() - t0
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", default="0.25,1,2", help="comma-separated square sizes, e.g. 0.25,1,2")
    parser.add_argument("--steps", type=int, default=4, help="steps per edit (the peak is reached in the first)")
    parser.add_argument("--level", default=AccelerationLevel.NONE.value, choices=[lv.value for lv in AccelerationLevel])
    args = parser.parse_args(argv)
    gpu = FakeGpu()
    config = dict(gpu.components.transformer.config)
    columns = ["size", "tokens (noise + context + text)", "weights GiB", "peak GiB", "peak in", "denoise peak GiB"]
    print("| " + " | ".join([*columns, "TFLOP per call"]) + " |")
    print("|" + " --- |" * 7)
    for mp in args.megapixels.split(","):
        size = timing.megapixel_size(float(mp))
        report = gpu.rehearse(size, args.steps, AccelerationLevel(args.level))
        n = (size[0] // 16) * (size[1] // 16)
        expected = floors.transformer_flops(config, 2 * n)
        call = report.calls[0]
        assert (call.matmul, call.attention) == (expected.matmul, expected.attention), (call, expected)
        peaks = report.phase_peaks
        print(
            f"| {size[0]}x{size[1]} | {n} + {n} + {sampling.TEXT_TOKENS} | {report.weight_bytes / GIB:.2f} "
            f"| {report.peak_bytes / GIB:.2f} | {max(peaks, key=peaks.get)} | {peaks['denoise'] / GIB:.2f} "
            f"| {call.matmul / 1e12:.1f} matmul + {call.attention / 1e12:.1f} attention |",
            flush=True,
        )
        print(report.summary(), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
