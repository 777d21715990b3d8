"""Several GPUs, one edit: the transformer under diffusers' context parallelism, the same way on every rank.

A server started with FLUX_GPUS=D runs D processes, one per GPU: rank 0 is the predictor (it encodes the text and
the images, runs the denoise loop and TaylorSeer, decodes, checks safety and writes the file), ranks 1..D-1 are
worker processes that hold the transformer only (flux.ranks starts them, flux.rank_worker is their main). Every
transformer call runs on all D ranks at once: diffusers' context parallelism (`enable_parallelism`, the FLUX
transformer's own `_cp_plan`) gives each rank 1/D of the image tokens (noise and context) and of the text tokens,
and the attention exchanges what it needs:

- Ulysses (the default): before each attention an all-to-all trades sequence for heads (each rank then attends
  over the whole sequence for 1/D of the heads), after it another trades them back. Four all-to-alls of the
  rank's share of Q, K, V and the output per attention layer.
- ring: each rank keeps its queries and sees every rank's keys and values in turn, merging the partial results
  with their log-sum-exp; it needs an attention backend that returns it (diffusers' `_native_cudnn`,
  `_native_flash`, `flash`, `sage`, ...; torch's SDPA, `native`, does not).

What this module holds is what every rank does alike: the settings from the environment, the split plan of a call
(`split_plan`), putting the parallelism on the transformer (`ContextParallel`) and gathering the output to rank 0.

Token counts that D does not divide. Of the 242 served shapes (flux.pipeline.served_shapes), 76 have an image token
count (noise + context) that 2 does not divide, 164 one that 4 does not divide, 201 one that 8 does not. Those
calls use diffusers' uneven split (`ulysses_anything` / `ring_anything`: `tensor_split`, the first ranks one token
longer), chosen per call from the call's own token counts, so no size is ever refused at request time. Calls whose
counts divide evenly keep the even split (no size exchange inside each attention). The output is gathered here,
not by the plan's own gather at `proj_out`: that one needs an all-gather of unequal sizes, which gloo lacks, so
each rank pads its share to the longest and rank 0, the only rank that needs the velocity, trims the padding.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flux.optimize import Shape
from flux.sampling import TEXT_TOKENS

logger = logging.getLogger(__name__)

ENV_GPUS = "FLUX_GPUS"
ENV_KIND = "FLUX_CONTEXT_PARALLEL"
ENV_CALL_TIMEOUT = "FLUX_PARALLEL_TIMEOUT_S"
ENV_SETUP_TIMEOUT = "FLUX_PARALLEL_SETUP_TIMEOUT_S"
ALL_GPUS = "all"
OUTPUT_LAYER = "proj_out"
"""The layer whose output the transformer's _cp_plan gathers; here it is left sharded and gathered by gather()."""
SDPA_BACKEND = "native"
"""diffusers' name for torch's scaled_dot_product_attention, the default attention backend: no log-sum-exp."""
ALL_DEGREES = (8, 4, 2, 1)
"""What FLUX_GPUS=all picks from: a power of two divides every call's 512 text tokens (any other degree sends every
call through the uneven split, which runs eagerly); 8 at most, since Ulysses cannot split FLUX.1's 24 attention
heads over 16."""


class Kind(enum.StrEnum):
    """How the attention is split across ranks (diffusers' ContextParallelConfig: ulysses_degree or ring_degree)."""

    ULYSSES = "ulysses"
    RING = "ring"


@dataclass(frozen=True)
class ParallelSettings:
    """How many processes (one per GPU) run each transformer call, and how; from the environment by from_env()."""

    degree: int = 1  # ranks, one per GPU; 1: no worker processes, the transformer as it is
    kind: Kind = Kind.ULYSSES
    # A transformer call that has not finished on every rank after this long ends the prediction (and the workers).
    call_timeout_s: float = 120.0
    # Worker processes that have not loaded, compiled and warmed up after this long end setup.
    setup_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or self.degree < 1:
            raise ValueError(f"the degree must be a positive number of processes, got {self.degree!r}")

    @property
    def enabled(self) -> bool:
        return self.degree > 1

    def describe(self) -> str:
        """e.g. "ulysses-2": also the name of the compile-cache folder of this setting."""
        return f"{self.kind.value}-{self.degree}"

    @classmethod
    def from_env(cls, device: str | torch.device, visible: int | None = None) -> ParallelSettings:
        """$FLUX_GPUS (a number, or "all": the largest of 8, 4, 2 and 1 that the GPUs torch sees (`visible`,
        torch.cuda.device_count() unless given) fit, see degree_for_all; on a machine without a GPU, "all" is 1 and a
        number runs that many CPU processes on gloo), $FLUX_CONTEXT_PARALLEL (ulysses or ring), and the deadlines
        $FLUX_PARALLEL_TIMEOUT_S and $FLUX_PARALLEL_SETUP_TIMEOUT_S. Raises ValueError naming the variable; logs
        what "all" picked, and warns of a number that sends every call through the uneven split."""
        device = torch.device(device)
        if visible is None:
            visible = torch.cuda.device_count() if device.type == "cuda" else 0
        raw = os.environ.get(ENV_GPUS, "").strip().lower() or "1"
        if raw == ALL_GPUS:
            degree = degree_for_all(visible if device.type == "cuda" else 0)
            if device.type == "cuda":
                logger.info("%s", _all_gpus_note(visible, degree))
        else:
            try:
                degree = int(raw)
            except ValueError:
                degree = 0
            if degree < 1:
                raise ValueError(f"{ENV_GPUS} must be a positive number of GPUs or {ALL_GPUS!r}, not {raw!r}")
            if note := uneven_text_warning(degree):
                logger.warning("%s", note)
        if device.type == "cuda" and degree > visible:
            raise ValueError(f"{ENV_GPUS}={raw} asks for {degree} GPUs, but torch sees {visible}")
        kind = os.environ.get(ENV_KIND, "").strip().lower() or Kind.ULYSSES.value
        if kind not in list(Kind):
            raise ValueError(f"{ENV_KIND} must be one of {[k.value for k in Kind]}, not {kind!r}")
        return cls(
            degree=degree,
            kind=Kind(kind),
            call_timeout_s=_seconds(ENV_CALL_TIMEOUT, cls.call_timeout_s),
            setup_timeout_s=_seconds(ENV_SETUP_TIMEOUT, cls.setup_timeout_s),
        )

    def check(self, heads: int, attention: str | None, whole_compile: bool = False) -> None:
        """Raise ValueError, at setup, for a setting no request could run with: Ulysses over more ranks than the
        model's attention heads can be split across (even with diffusers' head padding), ring with an attention
        backend that does not return the log-sum-exp, compile of the whole model (it would trace the uneven split,
        which dynamo cannot: see ContextParallel; regional compile runs those calls eagerly)."""
        if not self.enabled:
            return
        if whole_compile:
            raise ValueError(
                f"{ENV_GPUS}={self.degree} cannot run with compile of the whole transformer (FLUX_ACCELERATIONS): "
                "use regional (the default on a GPU)"
            )
        if self.kind is Kind.ULYSSES and not ulysses_splits_heads(heads, self.degree):
            raise ValueError(
                f"Ulysses over {self.degree} ranks cannot split the model's {heads} attention heads (diffusers pads "
                f"heads only when fewer than the heads per rank are missing): set {ENV_GPUS} to a divisor of "
                f"{heads}, or {ENV_KIND}=ring"
            )
        if self.kind is Kind.RING and (attention is None or attention == SDPA_BACKEND):
            raise ValueError(
                f"{ENV_KIND}=ring needs an attention backend that returns the log-sum-exp, which torch's SDPA (the "
                "default) does not: add attention=_native_cudnn (or _native_flash, flash, sage) to "
                "FLUX_ACCELERATIONS, or use ulysses"
            )


def degree_for_all(visible: int) -> int:
    """FLUX_GPUS=all's degree where torch sees `visible` GPUs: the largest of ALL_DEGREES that fits (1 for none)."""
    return next(degree for degree in ALL_DEGREES if degree <= max(visible, 1))


def _all_gpus_note(visible: int, degree: int) -> str:
    """The setup log's line for FLUX_GPUS=all: how many GPUs it took, and why when fewer than torch sees."""
    if degree == visible:
        return f"{ENV_GPUS}={ALL_GPUS}: {degree} GPUs, every one torch sees"
    head = f"{ENV_GPUS}={ALL_GPUS}: {degree} of the {visible} GPUs torch sees: "
    if visible > ALL_DEGREES[0]:
        return head + f"{ALL_DEGREES[0]} at most (Ulysses cannot split FLUX.1's 24 attention heads over 16)"
    return head + (
        f"a power of two divides every call's {TEXT_TOKENS} text tokens; over {visible} every call would take the "
        "uneven split (eager, no compile)"
    )


def uneven_text_warning(degree: int, text_tokens: int = TEXT_TOKENS) -> str | None:
    """What a degree that does not divide every call's text tokens costs (None when it divides them): every call
    takes the uneven split, which a compiled transformer runs eagerly (ContextParallel)."""
    if text_tokens % degree == 0:
        return None
    power = 1 << (degree.bit_length() - 1)
    return (
        f"{ENV_GPUS}={degree}: {degree} does not divide the {text_tokens} text tokens of every transformer call, so "
        "every call takes diffusers' uneven split, which runs eagerly (no compile) and exchanges the share sizes "
        f"inside each attention; {ENV_GPUS}={power} (a power of two) splits the text evenly and runs compiled for "
        f"every size whose image tokens divide by {power} too"
    )


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {raw!r}")
    return value


def ulysses_splits_heads(heads: int, degree: int) -> bool:
    """Whether Ulysses over `degree` ranks can split `heads` attention heads: evenly, or with diffusers' padding
    of the last rank's heads (ulysses_anything), which it allows only when fewer heads are missing than each
    rank holds."""
    if heads % degree == 0:
        return True
    missing = degree - heads % degree
    return missing < (heads + missing) // degree


# ---- the split of one call ---------------------------------------------------------------------------------


def shares(tokens: int, degree: int) -> list[int]:
    """Tokens per rank as torch.tensor_split gives them (and diffusers' shards): the first ranks one longer."""
    return [tokens // degree + (1 if rank < tokens % degree else 0) for rank in range(degree)]


@dataclass(frozen=True)
class SplitPlan:
    """How one transformer call is split: its token counts and whether diffusers' uneven split is needed."""

    kind: Kind
    degree: int
    image_tokens: int  # noise + context tokens (hidden_states)
    text_tokens: int  # T5 tokens (encoder_hidden_states)
    uneven: bool  # a count, or the heads (Ulysses), that the degree does not divide

    def image_shares(self) -> list[int]:
        return shares(self.image_tokens, self.degree)

    def describe(self) -> str:
        kind = "Ulysses" if self.kind is Kind.ULYSSES else "ring"
        image = self.image_shares()
        per_rank = f"{image[0]}" if len(set(image)) == 1 else f"{image[0]} or {image[-1]}"
        split = f"uneven ({self.kind.value}_anything)" if self.uneven else "even"
        return (
            f"{self.image_tokens} image + {self.text_tokens} text tokens over {self.degree} ranks, {kind}, {split}: "
            f"{per_rank} image tokens per rank"
        )


def split_plan(settings: ParallelSettings, heads: int, image_tokens: int, text_tokens: int) -> SplitPlan:
    """The split of a call with these token counts: even when the degree divides both counts (and, for Ulysses,
    the heads), else diffusers' uneven split."""
    degree = settings.degree
    uneven = image_tokens % degree != 0 or text_tokens % degree != 0
    if settings.kind is Kind.ULYSSES:
        uneven = uneven or heads % degree != 0
    return SplitPlan(settings.kind, degree, image_tokens, text_tokens, uneven)


def describe_plans(settings: ParallelSettings, heads: int, shapes: list[Shape], text_tokens: int) -> list[str]:
    """The setup log's plan: one line per served shape, and a first line that counts them."""
    plans = [split_plan(settings, heads, sum(shape.tokens()), text_tokens) for shape in shapes]
    uneven = sum(plan.uneven for plan in plans)
    lines = [
        f"context parallel plan, {settings.describe()}: {len(plans) - uneven} of {len(plans)} served shapes split "
        f"evenly, {uneven} unevenly; {heads} attention heads"
    ]
    for shape, plan in zip(shapes, plans, strict=True):
        contexts = " + ".join(f"{w}x{h}" for w, h in shape.contexts())
        lines.append(f"  {shape.width}x{shape.height} from {contexts}: {plan.describe()}")
    return lines


def check_shapes(settings: ParallelSettings, heads: int, shapes: list[Shape], text_tokens: int) -> list[Shape]:
    """The smallest served shape of each split (even, uneven): setup's first calls on every rank. With compile,
    each split has graphs of its own (diffusers reads the split mode inside the attention), compiled there."""
    chosen: dict[bool, Shape] = {}
    for shape in sorted(shapes, key=lambda s: sum(s.tokens())):
        chosen.setdefault(split_plan(settings, heads, sum(shape.tokens()), text_tokens).uneven, shape)
    return [chosen[uneven] for uneven in (False, True) if uneven in chosen]


# ---- the process group and the transformer ------------------------------------------------------------------


def join_group(rank: int, settings: ParallelSettings, store: dist.Store, device: torch.device) -> None:
    """Join the default process group: gloo on the CPU; on GPUs NCCL for tensors on the GPU and gloo for the CPU
    ones (diffusers gathers the share sizes of the uneven split on the CPU when gloo is there). Collectives wait
    at most the setup deadline: the serving deadline is kept by rank 0 (flux.ranks), which ends the workers."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=settings.setup_timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=settings.degree, timeout=timeout)


@contextlib.contextmanager
def _cpu_counts_as_one_device() -> Iterator[None]:
    """The one adapter to diffusers here. `enable_parallelism` (diffusers 0.42) picks a rank's device as
    `rank % torch.accelerator.device_count()`, which divides by zero where there is no accelerator (the CPU runs
    of the tests). For that call only, and only on such a machine, the CPU counts as one device; on a GPU
    machine nothing changes. The device it picks there is not used: the model is already on its device."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


class ContextParallel:
    """diffusers' context parallelism on this rank's transformer, the split chosen per call, the output gathered.

    Put on the transformer after its attention backend and fp8, before compile (flux.optimize.apply's `prepare`),
    so that compile traces the split and the collectives. Every rank must then make the same calls in the same
    order: each call is one set of collectives across all of them.
    """

    def __init__(self, transformer: torch.nn.Module, settings: ParallelSettings):
        from diffusers import ContextParallelConfig

        if not dist.is_initialized() or dist.get_world_size() != settings.degree:
            raise RuntimeError(f"context parallelism over {settings.degree} ranks needs a process group of that size")
        self.settings = settings
        self.rank = dist.get_rank()
        self.heads = transformer.config.num_attention_heads
        settings.check(self.heads, _attention_backend(transformer))
        plan = dict(type(transformer)._cp_plan or {})
        if OUTPUT_LAYER not in plan:
            name = type(transformer).__name__
            raise RuntimeError(f"{name}'s context-parallel plan no longer gathers at {OUTPUT_LAYER}")
        del plan[OUTPUT_LAYER]  # gathered by gather(), padded: see the module's docstring
        if settings.kind is Kind.ULYSSES:
            self.config = ContextParallelConfig(ulysses_degree=settings.degree)
        else:
            self.config = ContextParallelConfig(ring_degree=settings.degree)
        with _cpu_counts_as_one_device():
            transformer.enable_parallelism(config=self.config, cp_plan=plan)
        # Around diffusers' own hooks (which wrap forward and split the inputs): the split of each call.
        transformer.forward = self._split_each_call(transformer.forward)
        self.last: SplitPlan | None = None

    def plan(self, image_tokens: int, text_tokens: int) -> SplitPlan:
        return split_plan(self.settings, self.heads, image_tokens, text_tokens)

    def _split_each_call(self, forward: Callable) -> Callable:
        """`forward` with the split of each call chosen from its token counts. Calls that take the uneven split run
        with torch.compile's stance "force_eager": diffusers' uneven split exchanges the share sizes inside the
        attention, which dynamo cannot trace (torch 2.13: a fake-tensor error on the process group, measured with
        regional compile on the CPU by measure.parallel), so a compiled transformer runs those calls' blocks eagerly
        (even calls stay compiled); without compile the stance changes nothing."""

        @functools.wraps(forward)
        def split_forward(*args, **kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            plan = self.plan(hidden.shape[1], kwargs["encoder_hidden_states"].shape[1])
            # Read by diffusers' split hooks and attention at call time (the config object is shared by both).
            if self.settings.kind is Kind.ULYSSES:
                self.config.ulysses_anything = plan.uneven
            else:
                self.config.ring_anything = plan.uneven
            self.last = plan
            with torch.compiler.set_stance("force_eager") if plan.uneven else contextlib.nullcontext():
                return forward(*args, **kwargs)

        return split_forward

    def gather(self, local: torch.Tensor) -> torch.Tensor | None:
        """This rank's share of the last call's output (B, its image tokens, C) -> on rank 0 the whole output
        (B, image tokens, C), on the other ranks None. Each share is padded to the longest, so that every rank
        sends the same size (what gloo's and NCCL's gather take)."""
        shares = self.last.image_shares()
        if local.shape[1] != shares[self.rank]:
            share = shares[self.rank]
            raise RuntimeError(f"rank {self.rank} holds {local.shape[1]} output tokens, its share is {share}")
        longest = shares[0]
        padded = torch.nn.functional.pad(local, (0, 0, 0, longest - local.shape[1])).contiguous()
        if self.rank != 0:
            dist.gather(padded, None, dst=0)
            return None
        parts = [torch.empty_like(padded) for _ in shares]
        dist.gather(padded, parts, dst=0)
        return torch.cat([part[:, :n] for part, n in zip(parts, shares, strict=True)], dim=1)


def _attention_backend(transformer: torch.nn.Module) -> str | None:
    """The attention backend the transformer's processors were set to (set_attention_backend), None for the
    default."""
    for module in transformer.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            return str(getattr(backend, "value", backend))
    return None
