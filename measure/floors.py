"""The floor of a transformer call: its matmul FLOPs at the measured GEMM rate (bf16, or fp8 for the layers a
setting runs in fp8) plus its attention FLOPs at the best measured SDPA rate. `× floor` in the benchmark's
tables is seconds over that.

One rate for all FLOPs would mislead: attention is ~32 % of a 1 MP call's FLOPs (48 % at 2 MP) and runs well
below the GEMM rate, so an eager run could never come near the floor, and an fp8 row would read below it.

The rates are measured on the machine the figures come from (`measure_rates`, microbenchmarks of a few
seconds: the GEMM shaped like the transformer's MLP, SDPA at the served token counts with each backend).
ASSUMED_H100 holds the rates this project assumes before a GPU has measured them: it prices plans (how long
`script/bench-gpu quick` should take) and the host-side costs (measure.host), and is never a result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flux import clock, sampling

MLP_RATIO = 4  # FluxTransformerBlock / FluxSingleTransformerBlock hard-code a 4× MLP
TIMESTEP_CHANNELS = 256  # sinusoidal timestep / guidance projections


@dataclass(frozen=True)
class Flops:
    """FLOPs of one transformer call: matmuls of the linear layers, split where fp8 applies, and attention."""

    single: float  # the single-stream blocks' per-token linear layers (fp8 scope "single" runs these in fp8)
    double: float  # the double-stream blocks' per-token linear layers (fp8 scope "all" adds these)
    other: float  # embedders, the adaptive norms' modulation, the output layer (always bf16)
    attention: float  # QKᵀ and PV

    @property
    def matmul(self) -> float:
        return self.single + self.double + self.other

    @property
    def total(self) -> float:
        return self.matmul + self.attention

    def fields(self) -> dict:
        return dataclasses.asdict(self) | {"matmul": self.matmul, "total": self.total}


def transformer_flops(config: Mapping, image_tokens: int, text_tokens: int = sampling.TEXT_TOKENS) -> Flops:
    """FLOPs of one call of a FluxTransformer2DModel with `config`, batch 1.

    Counting: a (m × k) @ (k × n) matmul is 2·m·k·n FLOPs. D = heads × head dim, S = image + text tokens.
    - Each double-stream block runs, for the image and the text tokens (their own weights, same sizes):
      QKV (3·D²), attention output (D²) and a 4× MLP (8·D²) → 24·D² FLOPs per token; plus the modulation
      of two adaptive norms (D → 6D) on one vector each.
    - Each single-stream block, on all S tokens: QKV (3·D²), MLP in (4·D²), output of [attn | mlp]
      (5·D·D) → 24·D² per token; plus one modulation (D → 3D).
    - Attention per block: QKᵀ and PV over all heads, 2·S²·D each → 4·S²·D (no mask, no causal saving).
    - Embedders and the output layer: x (in_channels → D) per image token, context (joint dim → D) per text
      token, timestep / guidance / pooled-text MLPs and the output norm's modulation on one vector each, the
      output projection (D → in_channels) per image token.
    Norms, RoPE, activations and the residual adds are not matmuls and are left out (memory-bound, small).
    For FLUX.1 Kontext at 1024² (4096 + 4096 image tokens, 512 text tokens): ~112.4 TFLOP of matmuls and
    ~53.1 TFLOP of attention, ~165.5 TFLOP per call (measure.rehearsal counts the same op by op).
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    s = image_tokens + text_tokens
    mlp = MLP_RATIO * d
    double_tokens = 2 * s * (3 * d * d + d * d + 2 * d * mlp)
    single_tokens = 2 * s * (3 * d * d + d * mlp + (d + mlp) * d)
    modulation = config["num_layers"] * 2 * 2 * d * 6 * d + config["num_single_layers"] * 2 * d * 3 * d
    in_ch, joint, pooled = config["in_channels"], config["joint_attention_dim"], config["pooled_projection_dim"]
    vectors = 2 * (TIMESTEP_CHANNELS * d + d * d) * (2 if config.get("guidance_embeds") else 1)
    vectors += 2 * (pooled * d + d * d) + 2 * d * 2 * d
    embed = 2 * image_tokens * in_ch * d + 2 * text_tokens * joint * d + 2 * image_tokens * d * in_ch + vectors
    blocks = config["num_layers"] + config["num_single_layers"]
    return Flops(
        single=float(config["num_single_layers"] * single_tokens),
        double=float(config["num_layers"] * double_tokens),
        other=float(embed + modulation),
        attention=float(blocks * 4 * s * s * d),
    )


def full_config() -> dict:
    """FLUX.1 Kontext's transformer config (flux.tiny.FULL), without allocating the model."""
    from flux.tiny import FULL, build_pipeline

    return dict(build_pipeline(FULL, "meta", torch.bfloat16).transformer.config)


def image_tokens(size: tuple[int, int]) -> int:
    """Noise + context tokens of a match_input_image edit of `size` (width, height): one per 16×16 pixels."""
    return 2 * (size[0] // 16) * (size[1] // 16)


# ---- rates and floors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """FLOP/s by kind of work: GEMMs in the model's dtype, fp8 GEMMs, and the best SDPA backend."""

    gemm: float
    sdpa: float
    fp8_gemm: float | None = None
    source: str = "measured"  # or what they were assumed from


ASSUMED_H100 = Rates(
    gemm=700e12,  # bf16 dense, a large GEMM through cuBLAS: ~70 % of the 989 TFLOP/s peak (H200 here: 788 at 8192³)
    sdpa=550e12,  # the best of torch's SDPA backends at head dim 128 and 8.7k tokens (cuDNN's on Hopper)
    fp8_gemm=1200e12,  # row-scaled e4m3 (torch._scaled_mm): ~60 % of the 1979 TFLOP/s peak
    source="assumed for an H100 SXM (not measured)",
)


def for_setting(rates: Rates, fp8_scope: str | None) -> Rates:
    """`rates` for a setting: one with fp8 layers needs an fp8 GEMM rate, and takes the assumed one (saying
    so) where none was measured."""
    if fp8_scope and not rates.fp8_gemm:
        return dataclasses.replace(rates, fp8_gemm=ASSUMED_H100.fp8_gemm, source=f"{rates.source}; fp8 GEMM assumed")
    return rates


def fp8_flops(flops: Flops, fp8_scope: str | None) -> float:
    """The FLOPs a setting runs in fp8: the single-stream blocks' ("single"), or the double-stream ones' too."""
    if not fp8_scope:
        return 0.0
    return flops.single + (flops.double if fp8_scope == "all" else 0.0)


def call_floor(flops: Flops, rates: Rates, fp8_scope: str | None = None) -> float:
    """Seconds of one call at `rates`: fp8 layers at the fp8 GEMM rate, other matmuls at the GEMM rate,
    attention at the SDPA rate."""
    in_fp8 = fp8_flops(flops, fp8_scope)
    if in_fp8 and not rates.fp8_gemm:
        raise ValueError("an fp8 floor needs an fp8 GEMM rate")
    fp8_s = in_fp8 / rates.fp8_gemm if in_fp8 else 0.0
    return fp8_s + (flops.matmul - in_fp8) / rates.gemm + flops.attention / rates.sdpa


# ---- microbenchmarks ----------------------------------------------------------------------------------------

MLP_SHAPE = (8704, 3072, 12288)  # tokens at 1 MP × the MLP's input → output: the transformer's commonest GEMM
CPU_SHAPE = (1024, 1024, 1024)
SDPA_BACKENDS = ("flash", "cudnn", "efficient")


def _best_seconds(fn, device: torch.device, runs: int, per_run: int) -> float:
    """The best of `runs` timings of `per_run` calls of `fn` (after three untimed ones), per call."""
    for _ in range(3):
        fn()
    best = math.inf
    for _ in range(runs):
        t0 = clock.now(device)
        for _ in range(per_run):
            fn()
        best = min(best, (clock.now(device) - t0) / per_run)
    return best


def gemm_rate(device: torch.device, dtype: torch.dtype) -> dict:
    """FLOP/s of a GEMM shaped like the transformer's MLP at 1 MP on a GPU (a 1024³ one on the CPU)."""
    m, k, n = MLP_SHAPE if device.type == "cuda" else CPU_SHAPE
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    runs, per_run = (10, 10) if device.type == "cuda" else (5, 1)
    seconds = _best_seconds(lambda: a @ b, device, runs, per_run)
    return {
        "op": "gemm",
        "shape": [m, k, n],
        "dtype": str(dtype),
        "seconds": seconds,
        "flops_per_s": 2 * m * k * n / seconds,
    }


def fp8_gemm_rate(device: torch.device) -> dict:
    """FLOP/s of the same GEMM in e4m3 with per-row scales (torch._scaled_mm, as torchao's fp8 layers run it)."""
    m, k, n = MLP_SHAPE
    a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn)
    scale_a = torch.ones(m, 1, device=device)
    scale_b = torch.ones(1, n, device=device)

    def mm():
        return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)

    row = {"op": "fp8 gemm", "shape": [m, k, n], "dtype": "float8_e4m3fn"}
    try:
        seconds = _best_seconds(mm, device, 10, 10)
    except RuntimeError as e:  # no row-scaled fp8 kernel on this GPU: the other rates still count
        return row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return row | {"seconds": seconds, "flops_per_s": 2 * m * k * n / seconds}


def sdpa_rate(device: torch.device, dtype: torch.dtype, tokens: int, backend: str, heads: int, head_dim: int) -> dict:
    """FLOP/s of one attention of the transformer's (1, heads, tokens, head_dim) with one SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    kernel |= {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    flops = 4 * heads * tokens * tokens * head_dim
    row = {"op": "sdpa", "backend": backend, "tokens": tokens, "heads": heads, "head_dim": head_dim}
    try:
        with sdpa_kernel(kernel[backend]):
            seconds = _best_seconds(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                device,
                5,
                5 if device.type == "cuda" else 1,
            )
    except RuntimeError as e:  # no kernel of this backend for this device, dtype or shape
        return row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return row | {"seconds": seconds, "flops_per_s": flops / seconds}


def best_sdpa(rows: Sequence[dict], tokens: int | None = None) -> dict | None:
    """The fastest measured SDPA row (at `tokens` when given)."""
    ok = [r for r in rows if r.get("op") == "sdpa" and "flops_per_s" in r and tokens in (None, r["tokens"])]
    return max(ok, key=lambda r: r["flops_per_s"], default=None)


def rates_from(rows: Sequence[dict], tokens: int | None = None) -> Rates:
    """Rates from microbenchmark rows: the GEMM, the fp8 GEMM if measured, the best SDPA (at `tokens` if
    measured there, else at any size)."""
    gemm = next(r for r in rows if r.get("op") == "gemm")
    fp8 = next((r for r in rows if r.get("op") == "fp8 gemm" and "flops_per_s" in r), None)
    sdpa = best_sdpa(rows, tokens) or best_sdpa(rows)
    return Rates(gemm["flops_per_s"], sdpa["flops_per_s"], fp8["flops_per_s"] if fp8 else None)


def measure_rates(
    device: torch.device, dtype: torch.dtype, tokens: Sequence[int], heads: int, head_dim: int, fp8: bool = False
) -> list[dict]:
    """The microbenchmarks a floor needs, one row each: the GEMM, the fp8 GEMM (with `fp8`), and SDPA at each
    sequence length in `tokens` with each backend the device has (on the CPU: flash, torch's CPU kernel, and
    math)."""
    rows = [gemm_rate(device, dtype)]
    if fp8:
        rows.append(fp8_gemm_rate(device))
    backends = SDPA_BACKENDS if device.type == "cuda" else ("flash", "math")
    for n in sorted(set(tokens)):
        rows += [sdpa_rate(device, dtype, n, backend, heads, head_dim) for backend in backends]
    return rows
