"""Timed edits on a built model: ours at a level and diffusers' eager FluxKontextPipeline on the same weights, with
the seconds per phase, peak memory, compile counts and the cost of a skipped step; the pieces measure.bench and
measure.quick time with.
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import statistics
import sys
import time

import PIL.Image
import torch
from torch._dynamo.utils import counters

from flux import clock, sampling
from flux.model import FluxComponents
from flux.pipeline import EditRequest, KontextEditor
from flux.taylor_seer_utils import AccelerationLevel, generate_compute_step_map
from flux.tiny import FULL, TINY, build_pipeline

PROMPT = "make the car red"
SEED = 0

# ---- models -------------------------------------------------------------------------------------------


def build_components(config: str, device: torch.device) -> FluxComponents:
    """The components for `config` on `device`: "tiny" (flux.tiny's model, float32) or "full" (FLUX.1
    Kontext's dimensions, about 17B random parameters built directly on the GPU in bf16)."""
    if config == "tiny":
        return FluxComponents.from_pipeline(build_pipeline(TINY, device))
    if config == "full":
        if device.type != "cuda":
            raise SystemExit(
                "--config full needs a CUDA GPU: its ~17B random parameters (~34 GB in bf16) are built on the GPU. "
                "On the CPU use --config tiny."
            )
        return FluxComponents.from_pipeline(build_pipeline(FULL, device, torch.bfloat16))
    raise ValueError(f"unknown config {config!r}")


class TransformerSource:
    """The transformer for each acceleration setting in turn, each starting from the same eager weights.

    Fusion, fp8 and compile change the module in place, so a setting that follows one of them needs a fresh
    copy. The weights are copied to the CPU (24 GB for FLUX.1 in bf16, several seconds each way) only when a
    later setting will need them pristine: a plan whose settings leave the model as loaded, or that has one
    setting, never pays for the copy.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.cls, self.config = type(transformer), dict(transformer.config)
        self.device, self.dtype = transformer.device, transformer.dtype
        self._live: torch.nn.Module | None = transformer
        self._pristine = True
        self._state: dict[str, torch.Tensor] | None = None

    def get(self, modifies: bool, needed_later: bool) -> torch.nn.Module:
        """The eager transformer; `modifies`: the caller will change it; `needed_later`: a later caller
        needs it unchanged. Drop every reference to the previous one first: two may not fit in memory."""
        if not self._pristine:
            self._restore()
        if modifies and needed_later and self._state is None:
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in self._live.state_dict().items()}
        if modifies:
            self._pristine = False
        return self._live

    def _restore(self) -> None:
        assert self._state is not None, "a modified transformer was asked for again without a pristine copy"
        self._live = None
        free_memory(self.device)
        with torch.device("meta"):
            transformer = self.cls.from_config(self.config).to(self.dtype)
        transformer = transformer.to_empty(device=self.device)
        transformer.load_state_dict(self._state)
        self._live = transformer.eval().requires_grad_(False)
        self._pristine = True


# ---- measuring ----------------------------------------------------------------------------------------


_process_peaks = {"allocated": 0, "reserved": 0}  # CUDA peaks of the spans before the current one


def mark_memory(device: torch.device) -> None:
    """Start a new span of peak memory (before a setting is applied, so that quantisation, compilation and
    warm-up count); the process's peaks since it started are kept."""
    if device.type == "cuda":
        _fold_peaks(device)
        torch.cuda.empty_cache()  # the allocator's cache of the previous span is not this span's
        torch.cuda.reset_peak_memory_stats(device)


def _fold_peaks(device: torch.device) -> None:
    _process_peaks["allocated"] = max(_process_peaks["allocated"], torch.cuda.max_memory_allocated(device))
    _process_peaks["reserved"] = max(_process_peaks["reserved"], torch.cuda.max_memory_reserved(device))


def peak_memory(device: torch.device) -> dict:
    """Peak GPU memory since the last mark_memory(), allocated (tensors) and reserved (what the caching
    allocator took from the GPU), and the process's peaks since it started; on the CPU, the peak RSS."""
    if device.type == "cuda":
        _fold_peaks(device)
        return {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "process_peak_allocated_bytes": _process_peaks["allocated"],
            "process_peak_reserved_bytes": _process_peaks["reserved"],
            "peak_memory_kind": "cuda, since the setting was applied",
        }
    # ru_maxrss is the process's peak resident set (KiB on Linux) since it started: an upper bound.
    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_kind": "process peak RSS",
    }


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sample_image(width: int, height: int) -> PIL.Image.Image:
    """A deterministic gradient image (the content does not change the work done)."""
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    rgb = torch.stack([x, y, (x + y) / 2], dim=-1).to(torch.uint8).numpy()
    return PIL.Image.fromarray(rgb)


def request(level: AccelerationLevel, size: tuple[int, int], steps: int) -> EditRequest:
    """The benchmark's edit: its prompt, a gradient image of `size`, seed 0."""
    return EditRequest(PROMPT, sample_image(*size), num_inference_steps=steps, seed=SEED, acceleration=level)


def step_costs(editor: KontextEditor, request: EditRequest, size: tuple[int, int]) -> dict:
    """Median seconds of a computed and of a skipped denoising step, from one extra edit timed step by step."""
    device = editor.components.device
    marks: list[tuple[float, bool]] = []

    def on_step(step: sampling.Step) -> None:
        marks.append((clock.now(device), step.computed))

    editor.edit_at_size(request, size, size, on_step)
    computed, skipped = [], []
    for (t_prev, _), (t, was_computed) in zip(marks, marks[1:], strict=False):
        (computed if was_computed else skipped).append(t - t_prev)
    out = {"computed_step_s": statistics.median(computed) if computed else None}
    out["skipped_step_s"] = statistics.median(skipped) if skipped else None
    if computed and skipped:
        out["skip_cost_ratio"] = out["skipped_step_s"] / out["computed_step_s"]
    return out


def bench_ours(
    editor: KontextEditor,
    level: AccelerationLevel,
    size: tuple[int, int],
    steps: int,
    repeats: int,
    step_probe: bool = True,
    untimed: bool = True,
) -> dict:
    """With `untimed`, one untimed edit (first-run allocations, lazy initialisation); then the median of
    `repeats` timed ones; with `step_probe`, one more edit timed step by step when the level skips steps (at
    `none` there is no skipped step to compare)."""
    device = editor.components.device
    edit = request(level, size, steps)
    if untimed:
        editor.edit_at_size(edit, size, size)
    graphs = graphs_compiled()
    runs = []
    for _ in range(repeats):
        t0 = clock.now(device)
        result = editor.edit_at_size(edit, size, size)
        runs.append((clock.now(device) - t0, result))
    total, result = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    step_map = generate_compute_step_map(level, steps)
    out = {
        "level": level.value,
        "seconds": {**result.seconds, "total": total},
        "all_totals": sorted(r[0] for r in runs),
        "transformer_calls": result.transformer_calls,
        "expected_calls": sum(step_map),
        **peak_memory(device),
        "recompiles": graphs_compiled() - graphs,
    }
    if step_probe and not all(step_map):
        out.update(step_costs(editor, edit, size))
    return out


def bench_baseline(
    components: FluxComponents, size: tuple[int, int], steps: int, repeats: int, untimed: bool = True
) -> dict:
    """diffusers' FluxKontextPipeline, eager, on the same weights; the context image is given at `size`. With
    `untimed`, one untimed run first (without it, run it after ours on the same weights, so nothing is cold)."""
    c = components
    pipe = c.diffusers_pipeline()
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    hook = c.transformer.register_forward_pre_hook(count)
    width, height = size
    kwargs = dict(
        image=sample_image(width, height),
        prompt=PROMPT,
        width=width,
        height=height,
        max_area=width * height,
        num_inference_steps=steps,
        guidance_scale=sampling.DEFAULT_GUIDANCE,
        _auto_resize=False,
    )
    device = c.device
    mark_memory(device)
    try:
        if untimed:
            pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(SEED))
        times = []
        for _ in range(repeats):
            calls = 0
            t0 = clock.now(device)
            pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(SEED))
            times.append(clock.now(device) - t0)
    finally:
        hook.remove()
    return {
        "seconds": {"total": statistics.median(times)},
        "all_totals": sorted(times),
        "transformer_calls": calls,
        **peak_memory(device),
    }


def megapixel_size(megapixels: float) -> tuple[int, int]:
    """The square size (multiple of 16) nearest `megapixels` × 2²⁰ pixels."""
    side = max(16, round(math.sqrt(megapixels * 2**20) / 16) * 16)
    return side, side


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        size = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    if any(n <= 0 or n % 16 for n in size):
        raise argparse.ArgumentTypeError(f"size {text!r}: width and height must be positive multiples of 16")
    return size


_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, with seconds since the process imported this module (the log of a GPU run is
    often all there is to tell where the time went)."""
    print(f"[bench {time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)
