"""The GPU rehearsal on the CPU (measure.rehearsal): the full-size model in bfloat16 on a fake CUDA device runs
a whole 1 MP edit through KontextEditor with every op checked, and fails on a CPU tensor or a host sync planted
inside the denoise loop."""

import re
from pathlib import Path

import pytest
import torch

from flux.taylor_seer_utils import AccelerationLevel, generate_compute_step_map
from measure import floors, rehearsal

ROOT = Path(__file__).resolve().parent.parent
ONE_MP = (1024, 1024)


@pytest.fixture(scope="module")
def gpu():
    return rehearsal.FakeGpu()


def documented_peak_gib(size: tuple[int, int]) -> float:
    """The estimate docs/benchmarks.md gives for `size` (its rehearsal table)."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    row = re.search(rf"^\| {size[0]}x{size[1]} \| [^|]+ \| [\d.]+ \| ([\d.]+) \|", text, re.MULTILINE)
    assert row, f"docs/benchmarks.md has no rehearsal row for {size}"
    return float(row.group(1))


def test_a_whole_1mp_edit_runs_on_the_fake_gpu_with_every_op_checked(gpu):
    transformer = gpu.components.transformer
    assert transformer.device.type == "cuda" and transformer.dtype == torch.bfloat16
    params = sum(p.numel() for name in rehearsal.MODELS for p in getattr(gpu.components, name).parameters())
    assert gpu.weight_bytes >= 2 * params > 2 * 16e9  # FLUX.1 + T5-XXL + CLIP-L + VAE in bf16 (with buffers)

    report = gpu.rehearse(ONE_MP, 28, AccelerationLevel.GO_REALLY_FAST)
    assert len(report.calls) == sum(generate_compute_step_map(AccelerationLevel.GO_REALLY_FAST, 28)) == 13
    expected = floors.transformer_flops(dict(transformer.config), image_tokens=2 * 4096)
    assert all((c.matmul, c.attention) == (expected.matmul, expected.attention) for c in report.calls)
    assert report.loop_ops > 10_000
    # What reads back to the host, all outside the loop: the clock between phases, the finite check after the
    # loop, and the picture's copy.
    assert set(report.host_reads) == {
        "torch.cuda.synchronize",
        "aten.is_nonzero.default",
        "aten.to.dtype_layout to the host",
    }
    assert report.host_reads.count("aten.is_nonzero.default") == 1
    assert set(report.phase_peaks) >= {"text", "image", "denoise", "decode"}
    assert report.peak_bytes == max(report.phase_peaks.values()) > report.weight_bytes
    assert report.peak_bytes / rehearsal.GIB == pytest.approx(documented_peak_gib(ONE_MP), abs=0.02)


def plant_cpu_tensor(transformer):
    """Text position ids made afresh on the CPU at every call, as a careless refactoring might do."""

    def hook(module, args, kwargs):
        kwargs["txt_ids"] = torch.zeros(kwargs["txt_ids"].shape)
        return args, kwargs

    return transformer.register_forward_pre_hook(hook, with_kwargs=True).remove


def plant_item(transformer):
    """A Python float read from the timestep tensor at every call (e.g. for a log line)."""

    def hook(module, args, kwargs):
        float(kwargs["timestep"][0])

    return transformer.register_forward_pre_hook(hook, with_kwargs=True).remove


@pytest.mark.parametrize(
    "plant,says",
    [
        (plant_cpu_tensor, "a CPU op inside the denoise loop: aten.zeros"),
        (plant_item, "host sync inside the denoise loop: aten.item"),
    ],
    ids=["CPU tensor", ".item()"],
)
def test_a_planted_fault_in_the_loop_fails_the_rehearsal(gpu, plant, says):
    with pytest.raises(rehearsal.Violation, match=re.escape(says)):
        gpu.rehearse(ONE_MP, 4, AccelerationLevel.NONE, plant=plant)
