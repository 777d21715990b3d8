"""Accelerations of the transformer, applied in one place and in one order, each switchable.

    fuse QKV projections → attention backend → fp8 linear layers → torch.compile

`AccelerationConfig` says which are on; `apply()` applies them to a transformer; `optimize()` does
what serving needs around it: load persisted compile artifacts, apply, warm up the served shapes,
save the artifacts. "default" is resolved in one place (`resolve()`) from the transformer's own
device. With `AccelerationConfig()` (everything off) the transformer is left exactly as loaded (the
parity tests run that way).

Optional dependencies (torchao for fp8, the attention libraries behind some diffusers backends) are
imported only when asked for, and a missing one is an error that says what to install.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from flux import clock, sampling

logger = logging.getLogger(__name__)

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""Compile modes that record CUDA graphs: one per input shape, replayed into the same output buffers."""
PER_SHAPE_ATTENTION = ("_native_cudnn",)
"""Attention backends that build an execution plan per sequence length (cuDNN's), the first call of each."""
FP8_MIN_FEATURES = 1024
"""Linear layers narrower than this (in or out) stay in bf16: quantising their activations costs more
than the smaller matmul saves. Only a small test model needs a lower value (apply()'s argument)."""

ENV_ACCELERATIONS = "FLUX_ACCELERATIONS"
ENV_COMPILE_CACHE = "FLUX_COMPILE_CACHE"
COMPILE_CACHE_DIRNAME = "compile-cache"
"""Compile artifacts live in the weights directory by default, so they ship with the weights."""


class Fp8Scope(enum.StrEnum):
    """Which transformer blocks get fp8 linear layers."""

    SINGLE = "single"  # the 38 single-stream blocks only (as the public Replicate implementation)
    ALL = "all"  # the 19 double-stream blocks too


class CompileScope(enum.StrEnum):
    """What torch.compile compiles."""

    # The repeated blocks only (19 double-stream and 38 single-stream, one compiled graph per block class:
    # diffusers' compile_repeated_blocks). Compiles several times faster than the whole model, which is
    # what a restart waits for; the embedders and the output layer stay eager.
    REGIONAL = "regional"
    WHOLE = "whole"


@dataclass(frozen=True)
class AccelerationConfig:
    """Which accelerations `apply()` puts on the transformer; one field per acceleration, all off by default."""

    # Fuse each attention's Q, K, V projections into one matmul (diffusers' fuse_qkv_projections); the
    # separate weights are then dropped (4.3 GB in bf16 for FLUX.1).
    fuse_qkv: bool = False
    # A diffusers attention backend (attention_dispatch.AttentionBackendName), e.g. "_native_cudnn",
    # "_native_flash", "flash" (needs flash-attn), "sage" (needs sageattention); None: torch's SDPA.
    attention: str | None = None
    # torchao float8 dynamic-activation / float8-weight linear layers (per-row scales) in these blocks;
    # never the norms' modulation or narrow layers. CUDA with compute capability 8.9+ (Ada, Hopper).
    fp8: Fp8Scope | None = None
    # torch.compile with dynamic shapes: the token count changes with the output and input sizes, and
    # with static shapes every new size would be a recompile.
    compile: CompileScope | None = None
    compile_mode: str | None = None  # one of COMPILE_MODES; None is torch's default. Needs `compile`.

    def __post_init__(self) -> None:
        object.__setattr__(self, "fp8", None if self.fp8 is None else Fp8Scope(self.fp8))
        object.__setattr__(self, "compile", None if self.compile is None else CompileScope(self.compile))
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES[1:]}, got {self.compile_mode!r}")
        if self.compile_mode is not None and self.compile is None:
            raise ValueError("a compile mode needs compile on (compile or regional)")
        if self.compile is CompileScope.REGIONAL and self.compile_mode in CUDA_GRAPH_MODES:
            # Each block's graph would record a CUDA graph per token count and replay it into the same buffers,
            # overwriting the output the next block (or the next step's TaylorSeer state) still reads.
            raise ValueError(
                f"compile mode {self.compile_mode!r} records CUDA graphs, which regional compile with dynamic shapes "
                "would re-record for every token count in every block; use it with compile (the whole model), or "
                "regional with mode=max-autotune-no-cudagraphs"
            )

    @classmethod
    def default_for(cls, device: str | torch.device) -> AccelerationConfig:
        """What "default" means on `device`: regional compile on CUDA (ready soon after the weights load;
        why the others stay off is in docs/accelerations.md), nothing on the CPU (compiling costs minutes there)."""
        return cls(compile=CompileScope.REGIONAL) if torch.device(device).type == "cuda" else cls()

    @classmethod
    def parse(cls, spec: str) -> Accelerations:
        """A config from a spec: "off", "default" (returned as is, for resolve()), or names joined by "+":
        fuse, attention=NAME, fp8, fp8-all, compile, regional, mode=NAME (alone, it implies compile)."""
        spec = spec.strip().lower()
        if spec in (DEFAULT, "", "off", "none"):
            return DEFAULT if spec == DEFAULT else cls()
        fields: dict = {}
        for token in spec.split("+"):
            name, has_value, value = token.strip().partition("=")
            if not has_value and name in _SWITCHES:
                fields.update(_SWITCHES[name])
            elif has_value and value and name in _VALUES:
                fields[_VALUES[name]] = value
            else:
                names = ", ".join([*_SWITCHES, *(f"{n}=NAME" for n in _VALUES)])
                raise ValueError(
                    f"unknown acceleration {token!r} in {spec!r}; use off, default, or {names} joined by '+'"
                )
        if fields.get("compile_mode") and not fields.get("compile"):
            fields["compile"] = CompileScope.WHOLE
        return cls(**fields)

    def describe(self) -> str:
        """The parse() spec of this config."""
        parts = [name for name, fields in _SWITCHES.items() if all(getattr(self, k) == v for k, v in fields.items())]
        parts += [f"{name}={getattr(self, field)}" for name, field in _VALUES.items() if getattr(self, field)]
        return "+".join(parts) or "off"

    def plans_per_shape(self) -> bool:
        """Whether something prepares work per token count at its first call (CUDA graphs, cuDNN attention
        plans): then warm-up runs every served shape, not only what compilation needs."""
        return self.compile_mode in CUDA_GRAPH_MODES or self.attention in PER_SHAPE_ATTENTION

    def validate(self, device: str | torch.device) -> None:
        """Raise ValueError for a setting that cannot work on `device`, before anything is changed: this is
        where an attention backend is tried (a small call on `device`), not after fusion has changed the model."""
        device = torch.device(device)
        if self.fp8 and not self.compile:
            # Unfused, torchao's fp8 linear layers quantise each activation in a kernel of its own: usually
            # slower than bf16. fp8 measured without compile (measure.fidelity on the CPU) quantises directly.
            raise ValueError("fp8 needs compile on (fp8+regional or fp8+compile): without it fp8 is slower than bf16")
        if self.fp8 and device.type != "cuda":
            raise ValueError(f"fp8 needs a CUDA GPU with compute capability 8.9 or newer; the model is on {device}")
        if self.fp8 and (capability := torch.cuda.get_device_capability(device)) < (8, 9):
            raise ValueError(f"fp8 needs compute capability 8.9 or newer; this GPU has {capability[0]}.{capability[1]}")
        if self.attention is not None:
            from diffusers.models.attention_dispatch import AttentionBackendName

            names = sorted(b.value for b in AttentionBackendName)
            if self.attention not in names:
                raise ValueError(f"unknown attention backend {self.attention!r}; diffusers offers {names}")
            check_attention_backend(self.attention, device)


ATTENTION_PROBE_HEAD_DIM = 128  # FLUX.1's


def check_attention_backend(name: str, device: torch.device) -> None:
    """Raise ValueError unless diffusers' attention backend `name` runs here: its package is installed and a
    small call (the served dtype, FLUX.1's head size) works on `device`."""
    from diffusers.models.attention_dispatch import attention_backend, dispatch_attention_fn

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 16, 2, ATTENTION_PROBE_HEAD_DIM, device=device, dtype=dtype)  # (B, S, heads, head dim)
    try:
        with attention_backend(name), torch.inference_mode():
            dispatch_attention_fn(q, q, q)
    except Exception as e:  # a missing package (RuntimeError), no kernel for this device or dtype, ...
        raise ValueError(f"attention backend {name!r} cannot run on {device} ({dtype}): {e}") from e


# The spec's vocabulary, in the order describe() writes it: switches set fields, NAME=VALUE tokens set one.
_SWITCHES: dict[str, dict] = {
    "fuse": {"fuse_qkv": True},
    "fp8": {"fp8": Fp8Scope.SINGLE},
    "fp8-all": {"fp8": Fp8Scope.ALL},
    "compile": {"compile": CompileScope.WHOLE},
    "regional": {"compile": CompileScope.REGIONAL},
}
_VALUES: dict[str, str] = {"attention": "attention", "mode": "compile_mode"}

DEFAULT: Literal["default"] = "default"
Accelerations = AccelerationConfig | Literal["default"]
"""What callers pass: a config, or "default" for AccelerationConfig.default_for(the model's device)."""


def resolve(accelerations: Accelerations, device: str | torch.device) -> AccelerationConfig:
    """The config `accelerations` means for a model on `device`: the one place "default" is decided."""
    if accelerations == DEFAULT:
        return AccelerationConfig.default_for(device)
    if not isinstance(accelerations, AccelerationConfig):
        raise TypeError(f"accelerations must be an AccelerationConfig or {DEFAULT!r}, got {accelerations!r}")
    return accelerations


def accelerations_from_env() -> Accelerations:
    """The server's accelerations: $FLUX_ACCELERATIONS (a parse() spec), "default" when unset."""
    return AccelerationConfig.parse(os.environ.get(ENV_ACCELERATIONS, DEFAULT))


def compile_cache_from_env(weights_dir: str | Path) -> Path | None:
    """Where the server keeps compile artifacts: $FLUX_COMPILE_CACHE, else the weights directory's
    compile-cache/ (where the weight archives ship them); "" for nowhere."""
    cache = os.environ.get(ENV_COMPILE_CACHE)
    if cache is None:
        return Path(weights_dir) / COMPILE_CACHE_DIRNAME
    return Path(cache) if cache else None


def apply(
    transformer: torch.nn.Module,
    accelerations: Accelerations,
    *,
    fp8_min_features: int = FP8_MIN_FEATURES,
    compile_backend: str = "inductor",
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> AccelerationConfig:
    """Apply `accelerations` to `transformer` in place, in order: fuse → attention backend → fp8 → compile.

    Returns the resolved config. torch.compile is lazy: the first call compiles (see warm_up()). The
    keyword arguments are for small test models (fp8 on narrow layers) and tests (a compile backend
    without code generation); `prepare` is called on the transformer after fp8 and before compile (context
    parallelism goes there, flux.parallel: its hooks must be in place when the graph is traced).
    """
    config = resolve(accelerations, transformer.device)
    config.validate(transformer.device)
    if config.fuse_qkv:
        transformer.fuse_qkv_projections()
        _drop_unfused_projections(transformer)
    if config.attention is not None:
        transformer.set_attention_backend(config.attention)
    if config.fp8:
        quantize_fp8(transformer, config.fp8, fp8_min_features)
    if prepare is not None:
        prepare(transformer)
    if config.compile:
        options = dict(mode=config.compile_mode, dynamic=True, backend=compile_backend)
        if config.compile is CompileScope.REGIONAL:
            transformer.compile_repeated_blocks(**options)
        else:
            transformer.compile(**options)
    logger.info("transformer accelerations: %s", config.describe())
    return config


_UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def _drop_unfused_projections(transformer: torch.nn.Module) -> None:
    """After fusion, attention reads only to_qkv / to_added_qkv; diffusers keeps the separate projections
    (to unfuse later), which would hold a second copy of those weights for nothing."""
    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            for name in _UNFUSED:
                if isinstance(getattr(module, name, None), torch.nn.Module):
                    delattr(module, name)


def fp8_filter(scope: Fp8Scope, min_features: int = FP8_MIN_FEATURES):
    """The torchao filter for `scope`: which Linear layers (by module and qualified name) go fp8."""
    prefixes = ("single_transformer_blocks.",)
    if scope == Fp8Scope.ALL:
        prefixes += ("transformer_blocks.",)

    def keep(module: torch.nn.Module, name: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or not name.startswith(prefixes):
            return False
        if type(module.weight.data) is not torch.Tensor:  # quantised already (fp8-all after fp8, in place)
            return False
        if ".norm" in name:  # the adaptive norms' modulation: one row per image, nothing to gain
            return False
        # fp8 matmuls need dimensions that are multiples of 16.
        return all(n >= min_features and n % 16 == 0 for n in (module.in_features, module.out_features))

    return keep


def quantize_fp8(
    transformer: torch.nn.Module, scope: Fp8Scope = Fp8Scope.SINGLE, min_features: int = FP8_MIN_FEATURES
) -> int:
    """Float8 dynamic-activation / float8-weight (per-row) linear layers via torchao; returns how many.
    torchao's per-row fp8 takes bf16 weights only.

    torchao would also set process-wide inductor options it recommends (coordinate-descent tuning among
    them, which makes every later compile slower); set_inductor_config=False leaves them as they are.

    The matmuls are torch's own `torch._scaled_mm` (KernelPreference.TORCH), and the quantisation is torch
    code: nothing here needs torchao's compiled extensions. Those are built for one CUDA major version (the
    PyPI wheel of 0.18.0 links libcudart.so.13, the container's torch is the CUDA 12.8 build), so they are not
    loaded at all (TORCHAO_FORCE_SKIP_LOADING_SO_FILES, read by `import torchao`; cog.yaml sets it too).
    """
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        from torchao.quantization.quantize_.common import KernelPreference
    except ImportError as e:
        raise ImportError("fp8 needs torchao: pip install -r requirements-gpu.txt (torchao==0.18.0)") from e
    keep = fp8_filter(scope, min_features)
    count = sum(keep(m, n) for n, m in transformer.named_modules())
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), set_inductor_config=False, kernel_preference=KernelPreference.TORCH
    )
    quantize_(transformer, config, filter_fn=keep)
    logger.info("fp8 linear layers: %d (%s blocks)", count, scope.value)
    return count


# ---- warm-up ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One served transformer shape: output (noise) and context image sizes, in pixels; several reference
    images in `separate` mode add more context images, each its own plane of tokens."""

    width: int
    height: int
    context_width: int
    context_height: int
    more_contexts: tuple[tuple[int, int], ...] = ()  # (width, height) of each further context image

    def contexts(self) -> list[tuple[int, int]]:
        return [(self.context_width, self.context_height), *self.more_contexts]

    def tokens(self) -> tuple[int, int]:
        """(noise tokens, context tokens): one token per 16×16 pixels (8× VAE, 2×2 packing)."""
        return (self.width // 16) * (self.height // 16), sum((w // 16) * (h // 16) for w, h in self.contexts())


COMMON_SHAPE = Shape(1024, 1024, 1024, 1024)
"""The most common served shape: a square input at one megapixel, match_input_image."""


def warm_up_shapes(config: AccelerationConfig, served: list[Shape]) -> list[Shape]:
    """The shapes `config` needs warmed up before the first request, from the `served` ones.

    - Something plans per token count (CUDA graphs, cuDNN attention): every served token count once (the
      transformer sees [noise | context] tokens as one sequence, so shapes with the same total are one).
    - Compile with dynamic shapes and nothing else: one call compiles the graph that serves every size (the
      first served shape: the most common one). tests/test_optimize.py checks that other aspect ratios, 0.25 MP
      drafts and several reference images then compile nothing more.
    - Neither: nothing.
    """
    if config.plans_per_shape():
        seen: set[int] = set()
        return [s for s in served if sum(s.tokens()) not in seen and not seen.add(sum(s.tokens()))]
    return served[:1] if config.compile else []


@torch.inference_mode()
def warm_up(
    transformer: torch.nn.Module,
    shapes: list[Shape],
    text_tokens: int = sampling.TEXT_TOKENS,
    velocity_model: Callable[..., tuple] | None = None,
) -> float:
    """One transformer call per shape (random inputs), so compilation happens here and not in the
    first requests. Returns the seconds taken. The calls go to `velocity_model` when given (flux.ranks, which
    runs them on every rank), else to the transformer."""
    cfg = transformer.config
    device, dtype = transformer.device, transformer.dtype
    t0 = clock.now(device)
    channels = cfg.in_channels // 4
    generator = torch.Generator("cpu").manual_seed(0)
    for shape in shapes:
        contexts = [torch.randn(1, channels, h // 8, w // 8, generator=generator) for w, h in shape.contexts()]
        txt = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=generator)
        vec = torch.randn(1, cfg.pooled_projection_dim, generator=generator)
        contexts, txt, vec = [x.to(device, dtype) for x in contexts], txt.to(device, dtype), vec.to(device, dtype)
        inputs = sampling.kontext_inputs(contexts, txt, vec, shape.height // 8, shape.width // 8, seed=0)
        sampling.velocity(velocity_model or transformer, inputs, inputs.noise, 1.0, sampling.DEFAULT_GUIDANCE)
    seconds = clock.now(device) - t0
    logger.info("warmed up %d shapes in %.1f s", len(shapes), seconds)
    return seconds


# ---- persisted compile artifacts -------------------------------------------------------------------------


def artifact_path(
    cache_dir: str | Path, transformer: torch.nn.Module, config: AccelerationConfig, compile_backend: str = "inductor"
) -> Path:
    """The artifact file for this torch build, device, model config and acceleration config. Anything that
    changes the compiled code changes the name, so a stale artifact is never looked up."""
    device = transformer.device
    key = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dtype": str(transformer.dtype),
        "model": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
        "accelerations": dataclasses.asdict(config),
        "compile_backend": compile_backend,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"transformer-{digest}.bin"


def load_artifacts(path: Path) -> bool:
    """Load persisted compile artifacts into torch's caches. A missing or unreadable file is logged and
    ignored: compilation then runs as usual. Returns whether anything was loaded."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        logger.info("no compile artifacts at %s; compiling", path)
        return False
    except OSError as e:
        logger.warning("could not read compile artifacts %s (%s); compiling", path, e)
        return False
    try:
        info = torch.compiler.load_cache_artifacts(data)
    except Exception as e:  # a corrupt or incompatible file must never fail setup
        logger.warning("could not load compile artifacts %s (%s: %s); compiling", path, type(e).__name__, e)
        return False
    if info is None:
        logger.warning("compile artifacts %s held nothing usable; compiling", path)
        return False
    logger.info("loaded compile artifacts from %s", path)
    return True


def save_artifacts(path: Path) -> bool:
    """Write the compile artifacts gathered so far to `path` (atomically). Failure is logged, not raised."""
    try:
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            logger.warning("torch returned no compile artifacts to save")
            return False
        data, _ = result
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".partial")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except Exception as e:
        logger.warning("could not save compile artifacts to %s (%s: %s)", path, type(e).__name__, e)
        return False
    logger.info("saved compile artifacts (%d bytes) to %s", len(data), path)
    return True


def optimize(
    transformer: torch.nn.Module,
    accelerations: Accelerations = DEFAULT,
    cache_dir: str | Path | None = None,
    shapes: list[Shape] | None = None,
    **apply_options,
) -> dict[str, float]:
    """Everything serving needs: load compile artifacts from `cache_dir`, apply the accelerations, warm up what
    they need of the served `shapes` (warm_up_shapes(); None: COMMON_SHAPE only; the server passes
    flux.pipeline.served_shapes()), save the artifacts there. Returns seconds per part, each timed once the GPU
    has finished it. `apply_options` go to apply()."""
    seconds: dict[str, float] = {}
    device = transformer.device
    config = resolve(accelerations, device)
    path = None
    if config.compile and cache_dir is not None:
        path = artifact_path(cache_dir, transformer, config, apply_options.get("compile_backend", "inductor"))
        t0 = clock.now(device)
        load_artifacts(path)
        seconds["load_artifacts"] = clock.now(device) - t0
    t0 = clock.now(device)
    apply(transformer, config, **apply_options)
    seconds["apply"] = clock.now(device) - t0  # QKV fusion and fp8 quantisation run on the GPU
    warm = warm_up_shapes(config, [COMMON_SHAPE] if shapes is None else shapes)
    if warm:
        seconds["warm_up"] = warm_up(transformer, warm)
    if path is not None:
        t0 = clock.now(device)
        save_artifacts(path)
        seconds["save_artifacts"] = clock.now(device) - t0
    return seconds
