"""Fidelity of every shipped acceleration on the proxy model, pinned to the figures in docs/fidelity.md.

The quick setting of the harness (measure.fidelity) runs here on the shipped proxy
(tests/assets/proxy); each row must stay within a margin of the row recorded in docs/fidelity.md, so a
regression in the caching maths fails CI. Deliberately broken extrapolations (wrong sign, none at
all, one step late, a missing factorial) show that the floors bite.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from flux.pipeline import KontextEditor
from flux.taylor_seer_utils import TaylorSeerState
from measure import cases, fidelity

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "tests" / "assets" / "proxy"
PSNR_MARGIN_DB = 1.5
SSIM_MARGIN = 0.01
REL_MARGIN = 1.25  # latent rel L2 and extrapolation error may grow by this factor


def recorded_quick_rows() -> dict[str, dict[str, float]]:
    """The rows of docs/fidelity.md's quick-setting table: variant -> calls, psnr, ssim, rel L2, error."""
    text = (ROOT / "docs" / "fidelity.md").read_text()
    section = text.split("<!-- quick-table -->")[1].split("<!-- /quick-table -->")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not re.match(r"^\d", cells[1]):
            continue
        rows[cells[0]] = {
            "calls": float(cells[1].split()[0]),
            "psnr": float(cells[3].split()[0]),
            "ssim": float(cells[4]),
            "latent_rel_l2": float(cells[5]),
            "extrapolation_error_mean": float(cells[6].split("/")[0]),
        }
    return rows


@pytest.fixture(scope="module")
def proxy_editor():
    # One thread: the proxy is small, and on a shared CPU two threads were 30× slower per call.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield KontextEditor.from_pretrained(PROXY, device="cpu")
    torch.set_num_threads(threads)


def quick(editor):
    return fidelity.run_fidelity(editor, fidelity.quick_variants(), cases.synthetic_cases(2, 64))


def floor_failures(rows, recorded) -> list[str]:
    failures = []
    for row in rows:
        rec = recorded[row.variant]
        # fixed levels: exactly the recorded calls; adaptive rows: a decision near the threshold may flip
        # with another CPU's rounding
        if abs(row.calls - rec["calls"]) > (0 if row.probes == 0 else 1):
            failures.append(f"{row.variant}: {row.calls} calls, recorded {rec['calls']}")
        if row.psnr < rec["psnr"] - PSNR_MARGIN_DB:
            failures.append(f"{row.variant}: PSNR {row.psnr:.2f} dB < {rec['psnr']} - {PSNR_MARGIN_DB}")
        if row.ssim < rec["ssim"] - SSIM_MARGIN:
            failures.append(f"{row.variant}: SSIM {row.ssim:.4f} < {rec['ssim']} - {SSIM_MARGIN}")
        if row.latent_rel_l2 > rec["latent_rel_l2"] * REL_MARGIN:
            failures.append(f"{row.variant}: latent rel L2 {row.latent_rel_l2:.4f} > {REL_MARGIN}× recorded")
        if row.extrapolation_error_mean > rec["extrapolation_error_mean"] * REL_MARGIN:
            failures.append(f"{row.variant}: extrapolation error {row.extrapolation_error_mean:.4f} > {REL_MARGIN}×")
    return failures


def test_every_shipped_acceleration_stays_above_the_recorded_fidelity(proxy_editor):
    recorded = recorded_quick_rows()
    rows = quick(proxy_editor)
    assert {row.variant for row in rows} == set(recorded)
    assert floor_failures(rows, recorded) == []


# The quick rows that extrapolate with order 2 or more (the others use order 1). With order 3 the order-2
# term weighs less: its missing 1/2! stays within the floors there, the order-3 term's 1/3! does not.
ORDER_2_AND_UP = {
    "go really fast · default",
    "go fast, front-loaded · default",
    "go really fast, front-loaded · default",
}


def _wrong_sign(real):
    return lambda self, step, time=None: 2 * self.factors[0] - real(self, step, time)


def _stale(real):  # no extrapolation: reuse the last computed output
    return lambda self, step, time=None: self.factors[0].clone()


def _one_step_late(real):
    return lambda self, step, time=None: real(self, step + 1, time)


def _no_factorial(real, order=2):  # the order-2 term without its 1/2!
    def predict(self, step, time=None):
        out = real(self, step, time)
        if len(self.factors) > order:
            k = step - self.positions[-1]
            out = out + self.factors[order] * (k**order * (1 - 1 / math.factorial(order)))
        return out

    return predict


def _no_third_factorial(real):  # the order-3 term without its 1/3!
    return _no_factorial(real, order=3)


@pytest.mark.parametrize(
    "broken,rows_that_must_fail",
    [
        (_wrong_sign, "all"),
        (_stale, "all"),
        (_one_step_late, "all"),
        (_no_factorial, ORDER_2_AND_UP - {"go really fast, front-loaded · default"}),
        (_no_third_factorial, {"go really fast, front-loaded · default"}),  # the only quick row with order 3
    ],
)
def test_a_broken_extrapolation_fails_the_floors(proxy_editor, monkeypatch, broken, rows_that_must_fail):
    monkeypatch.setattr(TaylorSeerState, "predict", broken(TaylorSeerState.predict))
    recorded = recorded_quick_rows()
    rows = quick(proxy_editor)
    failing = {f.split(":")[0] for f in floor_failures(rows, recorded)}
    assert failing == ({row.variant for row in rows} if rows_that_must_fail == "all" else rows_that_must_fail)


def test_command_line_writes_the_table_and_json(proxy_editor, tmp_path, capsys):  # fixture: one thread
    out = tmp_path / "rows.json"
    assert fidelity.main(["--weights", str(PROXY), "--quick", "--cases", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == [v.name for v in fidelity.quick_variants()]
    assert all(r["variant"] in table for r in rows)
    assert rows[0]["calls"] == 18 and rows[1]["calls"] == 13


def test_metrics():
    a = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert cases.psnr(a, a) == cases.MAX_PSNR and cases.ssim(a, a) == pytest.approx(1.0)
    assert cases.psnr(a, (a + 0.1).clamp(0, 1)) == pytest.approx(20, abs=1.5)
    b = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert cases.ssim(a, b) < 0.1  # independent noise images
    # SSIM ignores a small uniform brightness shift far more than PSNR does
    assert cases.ssim(a, (a * 0.9 + 0.05)) > 0.95


def test_accelerated_variants_run_on_a_copy_and_are_measured(proxy_editor):
    """Accelerations and dtypes are measured on a copy of the transformer: the editor's own one is left
    as loaded. QKV fusion changes only the order of sums; bf16 changes the proxy a lot (it was trained in
    float32), and a reference run again is identical to itself."""
    transformer = proxy_editor.components.transformer
    before = {name: p.clone() for name, p in transformer.named_parameters()}
    level_none = fidelity.acceleration_variants("fuse")[0]
    again = fidelity.Variant("none again", level_none.level)
    rows = fidelity.run_fidelity(
        proxy_editor, [again, level_none, fidelity.bf16_variant()], cases.synthetic_cases(1, 64)
    )
    by_name = {row.variant: row for row in rows}
    assert by_name["none again"].psnr == cases.MAX_PSNR and by_name["none again"].latent_rel_l2 == 0
    fused = by_name["none · default · fuse"]
    assert (fused.accelerations, fused.dtype, fused.calls) == ("fuse", "float32", 28)
    assert fused.latent_rel_l2 < 1e-4
    bf16 = by_name["none · bf16"]
    assert bf16.dtype == "bfloat16" and 1e-3 < bf16.latent_rel_l2 < 1
    assert not any(getattr(m, "fused_projections", False) for m in transformer.modules())
    after = dict(transformer.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_fp8_on_the_cpu_is_refused_with_compile(proxy_editor):
    variant = fidelity.acceleration_variants("fp8+compile")[0]
    with pytest.raises(ValueError, match="without compile"):
        fidelity.accelerated_copy(proxy_editor.components.transformer, variant)
