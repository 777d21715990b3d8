"""LoRAs for a request: read with diffusers' Flux LoRA support, fused into the transformer's weights, kept there
while the next requests ask for the same ones, and taken out exactly when one asks for others or none.

diffusers reads each file and converts the key formats it knows (diffusers/peft, kohya, XLabs, fal Kontext) to
its own; peft injects the LoRA layers and merges them into the base weights (`fuse_lora`); the LoRA layers are
then removed again (`unload_lora`), which leaves the plain modules with the merged weights. Several LoRAs are
fused one after the other, in the request's order, each at its own strength. The transformer keeps its
structure, so a compiled transformer runs a LoRA request without recompiling.

The fused LoRAs stay in the weights after the edit: a request for the same files (the same bytes) at the same
strengths (warm) finds them there and fuses nothing. A request for other LoRAs, or none, first gives each touched
layer its original weight and bias back from a copy (peft adds a LoRA's lora_B bias, where it has one, to the
layer's bias). Subtracting the LoRA again (`unfuse_lora`) would not give the same bits (bfloat16 rounding), and
every request must give exactly the image a server that never saw another LoRA would give. The copies are made the
first time a layer is touched and kept: the base weights never change, so later LoRA requests pay only the copy
back. On a GPU a copy stays on the GPU while GPU_HEADROOM_BYTES stay free beside it (a device-to-device copy back:
milliseconds for every layer), else it goes to pinned host memory, from which the copies back are queued without
waiting (a LoRA over every linear layer of FLUX.1 touches ~24 GB: ~2 s over PCIe from pinned memory, several times
that from pageable memory, which also blocks the host). On the CPU it is a plain copy.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch

from flux import clock
from flux.errors import InvalidInputError

logger = logging.getLogger(__name__)

INPUT = "lora_weights"
ADAPTER = "request"
_PREFIX = "transformer."
_LORA_TENSORS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
MIN_LORA_STRENGTH, MAX_LORA_STRENGTH = -1.0, 3.0
"""lora_strength's range: 0 leaves the model as it is, 1 is the LoRA as trained, negative values push away
from it; beyond 3 a LoRA mostly destroys the image."""
MAX_LORAS = 3
"""LoRAs one request may fuse (each fused LoRA adds its own change to the same weights)."""


def check_strengths(strengths: Sequence[object]) -> None:
    """Raise InvalidInputError naming lora_weights for more than MAX_LORAS LoRAs, or lora_strength (and the item,
    when there are several) for a strength that is not a number from MIN_LORA_STRENGTH to MAX_LORA_STRENGTH."""
    if len(strengths) > MAX_LORAS:
        raise InvalidInputError(INPUT, f"holds at most {MAX_LORAS} LoRAs, got {len(strengths)}")
    for i, strength in enumerate(strengths):
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            error = InvalidInputError("lora_strength", f"must be a number, got {strength!r}")
        elif not MIN_LORA_STRENGTH <= strength <= MAX_LORA_STRENGTH:
            error = InvalidInputError(
                "lora_strength", f"must be between {MIN_LORA_STRENGTH} and {MAX_LORA_STRENGTH}, got {strength}"
            )
        else:
            continue
        raise error.for_item(i) if len(strengths) > 1 else error


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA to apply to an edit: a local .safetensors file and its strength."""

    path: Path
    strength: float = 1.0
    # The sha256 of the file's bytes (hex), when the caller knows it: the server's cache computes it while writing
    # the file. None: LoraSlot.use() reads the whole file to compute it, on every call (~1 s for a 1.3 GB LoRA).
    sha256: str | None = None


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


GPU_HEADROOM_BYTES = 16 * 2**30
"""Free GPU memory an original weight's copy must leave beside it to stay on the GPU: a 2 MP edit's tensors
peak about 3 GiB above the weights (docs/benchmarks.md, the fake-CUDA estimate), and compile, the allocator's cache
and the libraries' workspaces want more."""


def keeps_on_gpu(nbytes: int, free_bytes: int, headroom: int = GPU_HEADROOM_BYTES) -> bool:
    """Whether a copy of `nbytes` may stay on a GPU with `free_bytes` free: when `headroom` stays free after it."""
    return free_bytes - nbytes >= headroom


def _free_bytes(device: torch.device) -> int:
    """What the GPU could still give: free on the device, plus what torch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass(frozen=True)
class LoraUse:
    """What making the transformer's weights those of a request's LoRAs took."""

    reused: bool  # the same LoRAs at the same strengths were fused already: nothing was done
    seconds: dict[str, float] = field(default_factory=dict)  # lora_unload (the previous ones out), lora_load


def _identity(lora: LoraRequest) -> tuple:
    """What makes a fused LoRA the same as a requested one: the same bytes (their sha256, whatever the file's name;
    a file's path, inode and size say nothing about its bytes once it is rewritten or replaced) at the same
    strength."""
    digest = lora.sha256
    if digest is None:
        try:
            digest = file_sha256(lora.path)
        except OSError:  # nothing that can be fused: reading the file names it (lora_weights)
            return (None, str(lora.path), float(lora.strength))
    return (digest, float(lora.strength))


class LoraSlot:
    """Keeps a request's LoRAs fused in a transformer until a request asks for others (or none), then restores
    the exact original weights."""

    def __init__(self, transformer: torch.nn.Module, gpu_headroom: int = GPU_HEADROOM_BYTES):
        self.transformer = transformer
        self.gpu_headroom = gpu_headroom
        # parameter name (a touched layer's weight or bias) -> its original: on the GPU, in pinned host memory,
        # or on the CPU (see the module)
        self._originals: dict[str, torch.Tensor] = {}
        # _identity() of each LoRA fused now, in order; () while the weights are the original ones; None while a
        # fuse or a restore is under way, and after one was cut short (Cog cancels a prediction by raising in its
        # thread, wherever it is): the touched layers then hold a mix, and the next use() restores them in full.
        self._fused: tuple | None = ()
        self._touched: list[str] = []  # the layers whose weights (and biases) the fused LoRAs may have changed

    def check_supported(self) -> None:
        """Refuse the accelerations a LoRA cannot be fused into."""
        t = self.transformer
        if any(getattr(m, "fused_projections", False) for m in t.modules()):
            raise InvalidInputError(INPUT, "cannot be used: this server fuses the QKV projections (FLUX_ACCELERATIONS)")
        if not all(_is_plain(m.weight) for m in _linears(t)):
            raise InvalidInputError(INPUT, "cannot be used: this server runs fp8 linear layers (FLUX_ACCELERATIONS)")

    def use(self, loras: Sequence[LoraRequest]) -> LoraUse:
        """Make the transformer's weights the original ones with `loras` fused, in order, each at its strength
        (none: the original weights). Nothing is done when exactly these are fused already. Every file is read
        and checked before any weight changes, so a refused LoRA leaves the weights as they were; a failure
        while fusing leaves the original weights; a cancel that cuts a fuse or a restore short leaves them to
        the next use(), which restores every touched layer before anything else."""
        loras = tuple(loras)
        wanted = tuple(_identity(lora) for lora in loras)
        if wanted == self._fused:
            return LoraUse(reused=bool(loras))
        if loras:
            self.check_supported()
        device = self.transformer.device
        seconds: dict[str, float] = {}
        t0 = clock.now(device)
        read = [_read_for(self.transformer, lora.path, i, len(loras)) for i, lora in enumerate(loras)]
        load_s = clock.now(device) - t0
        if self._fused != ():
            t0 = clock.now(device)
            self.restore()
            seconds["lora_unload"] = clock.now(device) - t0
        if loras:
            t0 = clock.now(device)
            self._fused = None  # until every LoRA is fused
            targets = sorted({name for _, targets in read for name in targets})
            self._keep_originals(targets)  # before any of them changes: a layer in _touched always has its copy
            self._touched = targets
            try:
                for ((state_dict, alphas, metadata), _), lora in zip(read, loras, strict=True):
                    self._fuse(state_dict, alphas, metadata, lora.strength)
            except BaseException:
                self.restore()
                raise
            self._fused = wanted
            seconds["lora_load"] = load_s + clock.now(device) - t0
        return LoraUse(reused=False, seconds=seconds)

    def restore(self) -> None:
        """The original weights back, bit for bit; nothing is fused afterwards. Cut short, it leaves the slot
        marked unfinished, and the next use() restores every touched layer again."""
        self._fused = None
        self._restore(self._touched)
        self._touched, self._fused = [], ()

    def _fuse(
        self, state_dict: dict[str, torch.Tensor], alphas: dict | None, metadata: dict | None, strength: float
    ) -> None:
        kwargs = {"metadata": metadata} if metadata else {"network_alphas": alphas or None}
        self.transformer.load_lora_adapter(state_dict, prefix="transformer", adapter_name=ADAPTER, **kwargs)
        self.transformer.fuse_lora(lora_scale=strength, adapter_names=[ADAPTER])
        self.transformer.unload_lora()

    def _keep_originals(self, targets: list[str]) -> None:
        for key, param in _merged_parameters(self.transformer, targets):
            if key not in self._originals:
                self._originals[key] = self._copy(param.detach())

    def _copy(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.device.type != "cuda":
            return weight.to("cpu", copy=True)
        if keeps_on_gpu(weight.nbytes, _free_bytes(weight.device), self.gpu_headroom):
            return weight.clone()
        pinned = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
        return pinned.copy_(weight)  # waits for the copy: the weight is about to change

    def _restore(self, targets: list[str]) -> None:
        if hasattr(self.transformer, "peft_config") or _has_lora_layers(self.transformer):
            self.transformer.unload_lora()
        for attr in ("lora_scale", "_safe_fusing"):  # set by fuse_lora; the model had neither before
            self.transformer.__dict__.pop(attr, None)
        with torch.no_grad():
            for key, param in _merged_parameters(self.transformer, targets):
                # From the GPU or pinned memory: queued on the stream, before any later use of the weight.
                param.copy_(self._originals[key], non_blocking=True)


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
    """The transformer's LoRA tensors from a .safetensors file, in diffusers' format, with the alphas or the
    adapter metadata the file holds. Raises InvalidInputError naming lora_weights for anything else."""
    from diffusers.loaders import FluxLoraLoaderMixin

    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise InvalidInputError(INPUT, f"is not a readable .safetensors file ({type(e).__name__})") from None
    try:
        state_dict, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(
            str(path.parent),
            weight_name=path.name,
            use_safetensors=True,
            local_files_only=True,
            return_alphas=True,
            return_lora_metadata=True,
        )
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise InvalidInputError(INPUT, f"is not a FLUX LoRA that diffusers can read ({e})") from None
    if not any(k.startswith((_PREFIX, "text_encoder")) for k in state_dict):
        # A transformer adapter saved on its own (peft's save_lora_adapter) has no component prefix.
        state_dict = {_PREFIX + k: v for k, v in state_dict.items()}
        metadata = {_PREFIX + k: v for k, v in metadata.items()} if metadata else metadata
    ours = {k: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    if not ours:
        raise InvalidInputError(INPUT, "holds no LoRA layers for the FLUX transformer")
    ignored = len(state_dict) - len(ours)
    if ignored:
        logger.warning("lora_weights: %d tensors for the text encoders are not used", ignored)
    others = sorted(k for k in ours if not k.endswith(_LORA_TENSORS))
    if others:
        raise InvalidInputError(INPUT, f"holds tensors that are not LoRA layers, e.g. {others[0]}")
    return ours, alphas, metadata


def _read_for(
    transformer: torch.nn.Module, path: Path, index: int, count: int
) -> tuple[tuple[dict[str, torch.Tensor], dict | None, dict | None], list[str]]:
    """read_lora(path) and the transformer's layers it changes; errors name the item when there are several."""
    try:
        state_dict, alphas, metadata = read_lora(path)
        return (state_dict, alphas, metadata), _target_modules(state_dict, transformer)
    except InvalidInputError as e:
        raise (e.for_item(index) if count > 1 else e) from None


def _target_modules(state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module) -> list[str]:
    """The transformer's Linear layers that the LoRA changes, checked against the model's shapes."""
    modules = dict(transformer.named_modules())
    targets = sorted({k.removeprefix(_PREFIX).rsplit(".lora_", 1)[0] for k in state_dict})
    for name in targets:
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            raise InvalidInputError(INPUT, f"does not fit this model: it has no linear layer {name}")
        a, b = state_dict[f"{_PREFIX}{name}.lora_A.weight"], state_dict[f"{_PREFIX}{name}.lora_B.weight"]
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features or a.shape[0] != b.shape[1]:
            raise InvalidInputError(
                INPUT,
                f"does not fit this model: {name} is {module.in_features}→{module.out_features}, "
                f"the LoRA's is {a.shape[1]}→{b.shape[0]} (rank {a.shape[0]})",
            )
    return targets


def _merged_parameters(transformer: torch.nn.Module, targets: list[str]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Every tensor a merge into the `targets` layers may write, by its state_dict name: each layer's weight, and
    its bias (peft adds a LoRA's lora_B bias to it)."""
    modules = dict(transformer.named_modules())
    for name in targets:
        for param_name, param in modules[name].named_parameters(recurse=False):
            yield f"{name}.{param_name}", param


def _linears(transformer: torch.nn.Module) -> Iterator[torch.nn.Linear]:
    return (m for m in transformer.modules() if isinstance(m, torch.nn.Linear))


def _is_plain(weight: torch.Tensor) -> bool:
    return type(weight.data) is torch.Tensor


def _has_lora_layers(transformer: torch.nn.Module) -> bool:
    return any(hasattr(m, "base_layer") for m in transformer.modules())
