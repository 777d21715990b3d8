"""What keeping LoRAs fused between requests saves, side by side in one process (on the CPU here).

    python -m measure.lora [--config tiny|wide] [--rank 16] [--loras 1] [--repeats 5]

`cold` is what every LoRA request paid before LoRAs were kept warm, and what one still pays when the request
before it asked for other LoRAs: read the file(s), fuse them into the transformer's weights (peft, through
LoraSlot.use), and after the edit give the touched weights their original values back (LoraSlot.restore).
`warm` is the same request again: LoraSlot.use finds the same files at the same strengths fused and does
nothing. The two alternate, `--repeats` times each, on the same transformer; the median seconds of each and
their ratio are printed.

`tiny` is the tests' model. `wide` is a random transformer of FLUX.1's width (3072, 24 heads of 128) with one
double- and one single-stream block (about 0.4 B parameters; FLUX.1 has 19 + 38): its LoRA layers have the real
model's shapes, so the cost per block is the real model's on this machine. The LoRA is random, in diffusers'
format, on every attention projection and MLP layer of the blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from flux.lora import LoraRequest, LoraSlot, file_sha256
from flux.tiny import TINY, SyntheticConfig, build_pipeline

WIDE = dataclasses.replace(TINY, num_attention_heads=24, attention_head_dim=128, axes_dims_rope=(16, 56, 56))
CONFIGS = {"tiny": TINY, "wide": WIDE}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TARGETS += ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")


def write_random_lora(transformer: torch.nn.Module, path: Path, rank: int, seed: int) -> Path:
    """A random rank-`rank` LoRA on every target layer of the transformer's blocks, saved as diffusers saves one
    (`transformer.NAME.lora_A.weight`, `...lora_B.weight`; no alphas: scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name and name.endswith(TARGETS):
            a = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=generator) * 0.01
            tensors[f"transformer.{name}.lora_A.weight"] = a
            tensors[f"transformer.{name}.lora_B.weight"] = b
    save_file(tensors, path)
    return path


def measure(cfg: SyntheticConfig, rank: int, count: int, repeats: int) -> dict[str, float]:
    transformer = build_pipeline(cfg).transformer
    slot = LoraSlot(transformer)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_random_lora(transformer, Path(tmp) / f"lora-{i}.safetensors", rank, i) for i in range(count)]
        # with their digests, as the server's cache hands them over (computed once, while it writes each file)
        loras = [LoraRequest(path, 1.0, sha256=file_sha256(path)) for path in paths]
        slot.use(loras)  # the first fuse also keeps the CPU copies of the originals, once per server: not timed
        slot.restore()
        cold, warm = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            assert not slot.use(loras).reused
            slot.restore()
            cold.append(time.perf_counter() - t0)
            slot.use(loras)
            t0 = time.perf_counter()
            assert slot.use(loras).reused
            warm.append(time.perf_counter() - t0)
            slot.restore()
    parameters = sum(p.numel() for p in transformer.parameters())
    touched = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    return {
        "parameters": parameters,
        "linear parameters": touched,
        "cold s": cold_s,
        "warm s": warm_s,
        "cold / warm": cold_s / warm_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--loras", type=int, default=1, help="LoRAs per request (the server takes up to 3)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    row = measure(CONFIGS[args.config], args.rank, args.loras, args.repeats)
    print(
        f"{args.config}: {row['parameters'] / 1e6:.3g} M parameters, {args.loras} LoRA(s) of rank {args.rank}, "
        f"median of {args.repeats}: cold (read + fuse + restore) {row['cold s'] * 1e3:.2f} ms, "
        f"warm (reused) {row['warm s'] * 1e3:.3f} ms, cold / warm {row['cold / warm']:.0f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
