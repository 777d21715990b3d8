"""Accelerations of the transformer, applied in one place and in one order, each switchable.

    fuse QKV projections → attention backend → fp8 linear layers → torch.compile

`AccelerationConfig` says which are on; `apply()` applies them to a transformer; `prepare()` does
what serving needs around it: load persisted compile artifacts, apply, warm up the served shapes,
save the artifacts. With `AccelerationConfig.off()` the transformer is left exactly as loaded (the
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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flux import images, sampling

logger = logging.getLogger(__name__)

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FP8_MIN_FEATURES = 1024
"""Linear layers narrower than this (in or out) stay in bf16: quantising their activations costs more
than the smaller matmul saves."""

ENV_ACCELERATIONS = "FLUX_ACCELERATIONS"
ENV_COMPILE_CACHE = "FLUX_COMPILE_CACHE"
DEFAULT_COMPILE_CACHE = Path("weights") / "compile-cache"


class Fp8Scope(enum.StrEnum):
    """Which transformer blocks get fp8 linear layers."""

    SINGLE = "single"  # the 38 single-stream blocks only (as the public Replicate implementation)
    ALL = "all"  # the 19 double-stream blocks too


@dataclass(frozen=True)
class AccelerationConfig:
    """Which accelerations `apply()` puts on the transformer. Every one is off by default."""

    fuse_qkv: bool = False
    """Fuse the Q, K and V projections of each attention into one matmul (diffusers'
    fuse_qkv_projections). The separate Q, K, V weights are then dropped (4.3 GB in bf16 for FLUX.1)."""

    attention_backend: str | None = None
    """A diffusers attention backend name (diffusers.models.attention_dispatch.AttentionBackendName),
    e.g. "_native_cudnn", "_native_flash", "flash" (needs flash-attn), "_flash_3", "sage" (needs
    sageattention). None keeps the library default (torch's scaled_dot_product_attention)."""

    fp8: bool = False
    """Float8 dynamic-activation, float8-weight linear layers (torchao, per-row scales). CUDA with
    compute capability 8.9 or newer (Ada, Hopper) only."""

    fp8_scope: Fp8Scope = Fp8Scope.SINGLE
    """Which blocks get fp8 linear layers; norms' modulation layers and layers narrower than
    fp8_min_features never do."""

    fp8_min_features: int = FP8_MIN_FEATURES
    """Linear layers with fewer input or output features stay in bf16. Only a small test model (the
    fidelity proxy, 64-256 features wide) needs a lower value; it is not part of the parse() spec."""

    compile: bool = False
    """torch.compile the transformer."""

    compile_regional: bool = False
    """Compile only the repeated blocks (19 double-stream and 38 single-stream, one compiled graph per block
    class: diffusers' compile_repeated_blocks) instead of the whole transformer. Compiles several times
    faster, which is what a restart waits for; the embedders and the output layer stay eager."""

    compile_mode: str | None = None
    """torch.compile mode (one of COMPILE_MODES); None is torch's default."""

    compile_dynamic: bool = True
    """Compile with dynamic shapes. The token count changes with the output and input sizes; with
    static shapes every new size is a recompile. Dynamic shapes compile once for all of them."""

    compile_backend: str = "inductor"
    """torch.compile backend; tests use "aot_eager" to check recompiles without code generation."""

    cache_dir: Path | None = None
    """Where compiled artifacts are persisted (torch.compiler.save_cache_artifacts) after warm-up and
    loaded from at setup. None: nothing persisted. Only used with compile on."""

    @classmethod
    def off(cls) -> AccelerationConfig:
        """Everything off: the transformer runs as loaded."""
        return cls()

    @classmethod
    def default_for(cls, device: str | torch.device) -> AccelerationConfig:
        """What is on by default on `device`.

        CUDA: torch.compile of the repeated blocks, with dynamic shapes (regional compilation: a
        restart must be ready soon after the weights load, and compiling the whole model takes minutes;
        whole-model compile is one switch away, "compile"). fp8 stays off: on the proxy it costs more
        fidelity than TaylorSeer's skipped steps do (FIDELITY.md) and its speed-up is unmeasured. QKV
        fusion and a non-default attention backend stay off until the GPU benchmark shows they pay.
        None of this is measured on a GPU yet (BENCHMARKS.md). CPU: nothing (compiling takes minutes
        here and gains little).
        """
        if torch.device(device).type == "cuda":
            return cls(compile=True, compile_regional=True)
        return cls.off()

    @classmethod
    def parse(cls, spec: str, device: str | torch.device = "cpu") -> AccelerationConfig:
        """A config from a short spec: "off", "default" (default_for(device)), or names joined by "+":
        fuse, fp8, fp8-all, compile, regional (compile the blocks only), attention=NAME, mode=NAME,
        backend=NAME — e.g. "fuse+fp8+compile+attention=_native_cudnn"."""
        spec = spec.strip().lower()
        if spec in ("", "off", "none"):
            return cls.off()
        if spec == "default":
            return cls.default_for(device)
        fields: dict = {}
        for token in spec.split("+"):
            name, _, value = token.strip().partition("=")
            if name == "fuse" and not value:
                fields["fuse_qkv"] = True
            elif name == "fp8" and not value:
                fields["fp8"] = True
            elif name == "fp8-all" and not value:
                fields.update(fp8=True, fp8_scope=Fp8Scope.ALL)
            elif name == "compile" and not value:
                fields["compile"] = True
            elif name == "regional" and not value:
                fields.update(compile=True, compile_regional=True)
            elif name == "attention" and value:
                fields["attention_backend"] = value
            elif name == "mode" and value:
                fields.update(compile=True, compile_mode=value)
            elif name == "backend" and value:
                fields.update(compile=True, compile_backend=value)
            else:
                raise ValueError(
                    f"unknown acceleration {token!r} in {spec!r}; use off, default, or fuse, fp8, fp8-all, compile, "
                    "regional, attention=NAME, mode=NAME, backend=NAME joined by '+'"
                )
        return cls(**fields)

    @classmethod
    def from_env(cls, device: str | torch.device | None = None) -> AccelerationConfig:
        """The server's config: $FLUX_ACCELERATIONS (a parse() spec, default "default") and
        $FLUX_COMPILE_CACHE (the artifact directory, default weights/compile-cache; "" for none).
        `device` defaults to CUDA when there is one, as KontextEditor.from_pretrained does."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        config = cls.parse(os.environ.get(ENV_ACCELERATIONS, "default"), device)
        cache = os.environ.get(ENV_COMPILE_CACHE, str(DEFAULT_COMPILE_CACHE))
        return dataclasses.replace(config, cache_dir=Path(cache) if cache else None)

    def describe(self) -> str:
        """The parse() spec of this config (without the cache directory)."""
        parts = []
        if self.fuse_qkv:
            parts.append("fuse")
        if self.attention_backend:
            parts.append(f"attention={self.attention_backend}")
        if self.fp8:
            parts.append("fp8" if self.fp8_scope == Fp8Scope.SINGLE else "fp8-all")
        if self.compile:
            parts.append("regional" if self.compile_regional else "compile")
            if self.compile_mode:
                parts.append(f"mode={self.compile_mode}")
            if self.compile_backend != "inductor":
                parts.append(f"backend={self.compile_backend}")
        return "+".join(parts) or "off"

    def validate(self, device: str | torch.device) -> None:
        """Raise ValueError for a setting that cannot work on `device`, before anything is changed."""
        device = torch.device(device)
        if self.fp8:
            if device.type != "cuda":
                raise ValueError(f"fp8 needs a CUDA GPU with compute capability 8.9 or newer; the model is on {device}")
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 9):
                major, minor = capability
                raise ValueError(f"fp8 needs compute capability 8.9 or newer; this GPU has {major}.{minor}")
        if self.attention_backend is not None:
            from diffusers.models.attention_dispatch import AttentionBackendName

            names = sorted(b.value for b in AttentionBackendName)
            if self.attention_backend not in names:
                raise ValueError(f"unknown attention backend {self.attention_backend!r}; diffusers offers {names}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")


def apply(transformer: torch.nn.Module, config: AccelerationConfig) -> torch.nn.Module:
    """Apply `config` to `transformer` in place, in order: fuse → attention backend → fp8 → compile.

    Returns the same module. torch.compile is lazy: the first call compiles (see warm_up()).
    """
    config.validate(transformer.device)
    if config.fuse_qkv:
        transformer.fuse_qkv_projections()
        _drop_unfused_projections(transformer)
    if config.attention_backend is not None:
        transformer.set_attention_backend(config.attention_backend)
    if config.fp8:
        quantize_fp8(transformer, config.fp8_scope, config.fp8_min_features)
    if config.compile:
        options = dict(mode=config.compile_mode, dynamic=config.compile_dynamic, backend=config.compile_backend)
        if config.compile_regional:
            transformer.compile_repeated_blocks(**options)
        else:
            transformer.compile(**options)
    logger.info("transformer accelerations: %s", config.describe())
    return transformer


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
        if ".norm" in name:  # the adaptive norms' modulation: one row per image, nothing to gain
            return False
        # fp8 matmuls need dimensions that are multiples of 16.
        return all(n >= min_features and n % 16 == 0 for n in (module.in_features, module.out_features))

    return keep


def quantize_fp8(
    transformer: torch.nn.Module, scope: Fp8Scope = Fp8Scope.SINGLE, min_features: int = FP8_MIN_FEATURES
) -> int:
    """Float8 dynamic-activation / float8-weight (per-row) linear layers via torchao; returns how many.
    torchao's per-row fp8 takes bf16 weights only."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise ImportError("fp8 needs torchao: pip install -r requirements-gpu.txt (torchao==0.18.0)") from e
    keep = fp8_filter(scope, min_features)
    count = sum(keep(m, n) for n, m in transformer.named_modules())
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=keep)
    logger.info("fp8 linear layers: %d (%s blocks)", count, scope.value)
    return count


# ---- warm-up ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One served transformer shape: output (noise) and context image sizes, in pixels."""

    width: int
    height: int
    context_width: int
    context_height: int

    def tokens(self) -> tuple[int, int]:
        """(noise tokens, context tokens): one token per 16×16 pixels (8× VAE, 2×2 packing)."""
        return (self.width // 16) * (self.height // 16), (self.context_width // 16) * (self.context_height // 16)


def served_shapes() -> list[Shape]:
    """Every shape the server runs for inputs of the served aspect ratios: match_input_image at each
    preferred Kontext resolution, and each fixed aspect ratio with an input of that aspect ratio."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    shapes = {Shape(w, h, w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS}
    for w, h in images.ASPECT_RATIO_SIZES.values():
        shapes.add(Shape(w, h, *images.kontext_size(w, h)))
    return sorted(shapes, key=lambda s: (s.tokens(), s.width))


@torch.inference_mode()
def warm_up(transformer: torch.nn.Module, shapes: list[Shape], text_tokens: int = 512) -> float:
    """One transformer call per shape (random inputs), so compilation happens here and not in the
    first requests. Returns the seconds taken."""
    t0 = time.perf_counter()
    cfg = transformer.config
    device, dtype = transformer.device, transformer.dtype
    channels = cfg.in_channels // 4
    generator = torch.Generator("cpu").manual_seed(0)
    for shape in shapes:
        context = torch.randn(1, channels, shape.context_height // 8, shape.context_width // 8, generator=generator)
        txt = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=generator)
        vec = torch.randn(1, cfg.pooled_projection_dim, generator=generator)
        context, txt, vec = (x.to(device, dtype) for x in (context, txt, vec))
        inputs = sampling.prepare(context, txt, vec, shape.height // 8, shape.width // 8, seed=0)
        sampling.denoise(transformer, inputs, [1.0, 0.0], 2.5, [True])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    logger.info("warmed up %d shapes in %.1f s", len(shapes), seconds)
    return seconds


# ---- persisted compile artifacts -------------------------------------------------------------------------


def artifact_path(cache_dir: Path, transformer: torch.nn.Module, config: AccelerationConfig) -> Path:
    """The artifact file for this torch build, device, model config and acceleration config. Anything that
    changes the compiled code changes the name, so a stale artifact is never looked up."""
    device = transformer.device
    key = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dtype": str(transformer.dtype),
        "model": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
        "accelerations": dataclasses.asdict(dataclasses.replace(config, cache_dir=None)),
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


def prepare(
    transformer: torch.nn.Module, config: AccelerationConfig, shapes: list[Shape] | None = None
) -> dict[str, float]:
    """Everything serving needs: load artifacts, apply `config`, warm up `shapes` (served_shapes() by
    default) when compiling, save artifacts. Returns seconds per part."""
    seconds: dict[str, float] = {}
    path = artifact_path(config.cache_dir, transformer, config) if config.compile and config.cache_dir else None
    if path is not None:
        t0 = time.perf_counter()
        load_artifacts(path)
        seconds["load_artifacts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply(transformer, config)
    seconds["apply"] = time.perf_counter() - t0
    if config.compile:
        seconds["warm_up"] = warm_up(transformer, served_shapes() if shapes is None else shapes)
    if path is not None:
        t0 = time.perf_counter()
        save_artifacts(path)
        seconds["save_artifacts"] = time.perf_counter() - t0
    return seconds
