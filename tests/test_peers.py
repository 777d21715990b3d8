"""The peers harness (measure.peers, measure.peer_methods): what it counts, how it prices, that it is fair to each.

The full comparison is slow and lives in docs/fidelity.md; here each piece runs once on the shipped proxy. The
cache-dit test skips without the optional dependency (requirements-peers.txt).
"""

import pytest
import torch

from flux import sampling
from flux.pipeline import KontextEditor
from flux.taylor_seer_utils import SCHEDULE_DEFAULT_ORDER, AccelerationLevel, StepSchedule, generate_compute_step_map
from measure import cases, fidelity, peer_methods, peers
from measure.peer_methods import DiffusersTaylorSeer, Pricing
from measure.variants import AdaptiveConfig, WarmupSchedule, first_block_residual
from tests.test_fidelity import PROXY


@pytest.fixture(scope="module")
def proxy_editor():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the proxy is small; on a shared CPU more threads are slower
    yield KontextEditor.from_pretrained(PROXY, device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_case(proxy_editor):
    return cases.prepare_cases(proxy_editor, cases.synthetic_cases(1, 64, peers.TUNING_SEED))


def final_tokens(editor, candidate, case):
    steps = len(case.timesteps) - 1
    with torch.inference_mode(), candidate.attached(editor.components.transformer, steps) as model:
        with peer_methods.BlockCounter(model) as counter:
            tokens = candidate.denoise(model, case, sampling.DEFAULT_GUIDANCE)
            return tokens, counter.calls


def test_block_counter_prices_full_calls_and_first_block_probes(proxy_editor, one_case):
    transformer = proxy_editor.components.transformer
    inputs = one_case[0].inputs
    with torch.inference_mode(), peer_methods.BlockCounter(transformer) as counter:
        sampling.velocity(transformer, inputs, inputs.noise, 0.5, 2.5)
        first_block_residual(transformer, inputs, inputs.noise, 0.5, 2.5)
        assert counter.calls == [4, 1]  # the proxy: 2 double + 2 single blocks
        cost = counter.take()
    assert cost == peer_methods.Cost(proxy=1.25, flux=1 + 1 / 57)
    assert counter.calls == []
    assert not transformer._forward_pre_hooks  # the counter's hooks are gone


@pytest.mark.parametrize(
    "level,hook",
    [
        (AccelerationLevel.GO_FAST, DiffusersTaylorSeer(warmup=4, interval=2, cooldown_from=24, order=1)),
        (AccelerationLevel.GO_REALLY_FAST, DiffusersTaylorSeer(warmup=3, interval=3, cooldown_from=25, order=2)),
    ],
)
def test_diffusers_taylorseer_lite_is_our_extrapolation_on_the_named_maps(proxy_editor, one_case, level, hook):
    """Same map, same recursion: the peer and the named level give the same edit, so at the seed's maps the
    method itself gives no edge either way; the hook's calls are the ones its rule says."""
    case = one_case[0]
    assert hook.step_map(28) == generate_compute_step_map(level, 28)
    ours, our_calls = final_tokens(proxy_editor, peer_methods.NamedLevel(level), case)
    theirs, their_calls = final_tokens(proxy_editor, hook, case)
    assert our_calls == [4] * sum(hook.step_map(28))
    assert their_calls == [4 if c else 0 for c in hook.step_map(28)]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_peers_run_on_a_copy_and_count_only_the_blocks_they_run(proxy_editor, one_case):
    case = one_case[0]
    transformer = proxy_editor.components.transformer
    ratios = peers.calibrate_mag_ratios(proxy_editor, one_case)
    assert len(ratios) == 28 and ratios[0] == 1.0 and all(0.5 < r < 2 for r in ratios)
    _, fbc_calls = final_tokens(proxy_editor, peer_methods.DiffusersFirstBlock(0.1), case)
    _, mag_calls = final_tokens(proxy_editor, peer_methods.DiffusersMagCache(0.1, 3, 0.2, ratios), case)
    assert len(fbc_calls) == len(mag_calls) == 28  # one call per step: the hook decides inside
    assert set(fbc_calls) == {1, 4} and set(mag_calls) == {0, 4}  # probes run the first block; MagCache none
    # the editor's transformer is untouched: no hook on it, and level none is still the reference
    assert not getattr(transformer, "_diffusers_hook", None)
    again = peers.evaluate(proxy_editor, peer_methods.NamedLevel(AccelerationLevel.NONE), one_case)
    assert (again.psnr, again.latent_rel_l2, again.cost) == (cases.MAX_PSNR, 0.0, peer_methods.Cost(28, 28))


def test_our_adaptive_level_is_priced_by_its_probes(proxy_editor, one_case):
    candidate = peer_methods.OurAdaptive(AdaptiveConfig(threshold=0.1), order=1)
    m = peers.evaluate(proxy_editor, candidate, one_case)
    _, calls = final_tokens(proxy_editor, candidate, one_case[0])
    full, probes = calls.count(4), calls.count(1)
    assert full + probes == len(calls) and probes == 28 - 2 * 3  # every unprotected step is probed
    assert m.cost.proxy == full + probes / 4 and m.cost.flux == pytest.approx(full + probes / 57)


def measured(name, proxy, flux, psnr):
    candidate = peer_methods.DiffusersFirstBlock(threshold=len(name) / 100)
    return peers.Measured(candidate, peer_methods.Cost(proxy, flux), psnr, psnr, 1.0, 0.0, [psnr])


def test_choose_takes_the_most_faithful_configuration_within_the_budget_in_the_given_pricing():
    cheap, probing, dear = measured("a", 12, 12, 40), measured("bb", 17.5, 13, 50), measured("ccc", 19, 19, 60)
    options = [cheap, probing, dear]
    assert peers.choose(options, 18, Pricing.PROXY) is probing
    assert peers.choose(options, 13, Pricing.PROXY) is cheap
    assert peers.choose(options, 13, Pricing.FLUX) is probing  # its probes cost 1/57 there
    assert peers.choose(options, 10, Pricing.FLUX) is None


def test_tuning_held_out_and_calibration_cases_share_nothing():
    sets = [
        cases.synthetic_cases(16, 64, seed) for seed in (peers.TUNING_SEED, peers.HELD_OUT_SEED, peers.CALIBRATION_SEED)
    ]
    seeds = [{c.seed for c in cases} for cases in sets]
    assert not (seeds[0] & seeds[1] or seeds[0] & seeds[2] or seeds[1] & seeds[2])
    images = [c.image for cases in sets for c in cases]
    assert len({tuple(img.flatten()[::97].tolist()) for img in images}) == len(images)


def test_the_sweep_covers_every_method_at_both_budgets():
    series = peers.sweep(28, peers.BUDGETS, [1.0] * 28)
    methods = {s[0].method for s in series}
    assert methods == {
        "ours · step map",
        "ours · adaptive",
        "diffusers TaylorSeer (lite)",
        "diffusers FirstBlockCache",
        "diffusers MagCache",
        "cache-dit DBCache F1B0",
        "cache-dit DBCache F1B0 + TaylorSeer",
    }
    fixed = [s[0] for s in series if isinstance(s[0], peer_methods.OurSchedule | peer_methods.DiffusersTaylorSeer)]
    for budget in peers.BUDGETS:  # the named maps are among the fixed ones tried
        level = peers.NAMED[budget]
        assert any(
            isinstance(c, peer_methods.OurSchedule) and c.schedule.step_map(28) == generate_compute_step_map(level, 28)
            for c in fixed
        )
    for c in fixed:
        step_map = c.schedule.step_map(28) if isinstance(c, peer_methods.OurSchedule) else c.step_map(28)
        assert sum(step_map) in peers.BUDGETS
    adaptive = [s for s in series if hasattr(s[0], "threshold")]
    assert all(len(s) == len(peers.THRESHOLDS) for s in adaptive) and len(adaptive) + len(fixed) == len(series)
    assert all([c.threshold for c in s] == sorted(c.threshold for c in s) for s in adaptive)  # more calls first


def test_run_peers_reports_each_budget_and_skips_what_is_not_installed(proxy_editor, monkeypatch):
    """The whole flow on a tiny sweep: named rows, one chosen row per method and budget (two for a method
    priced by its blocks), and a line saying what to install for a missing peer."""
    small = [
        [peer_methods.OurSchedule(WarmupSchedule(7, 2, 0, 1), 1)],
        [peer_methods.OurSchedule(WarmupSchedule(5, 3, 1, 1), 2)],
        [peer_methods.DiffusersFirstBlock(t) for t in (0.05, 0.2, 0.5, 1.0)],
        [peer_methods.CacheDitDBCache(0.1, 4, -1, None)],
    ]
    monkeypatch.setattr(peers, "sweep", lambda steps, budgets, ratios: small)
    monkeypatch.setattr(peers, "cache_dit_available", lambda: False)
    monkeypatch.setattr(peers, "CALIBRATION_CASES", 1)
    report = peers.run_peers(proxy_editor, cases=1, top_schedules=1)
    rows = [(r.budget, r.method, r.pricing) for r in report.rows]
    assert rows[:3] == [
        (18, "ours · named level", "both"),
        (18, "ours · step map", "both"),
        (18, "diffusers FirstBlockCache", "proxy"),
    ]
    assert (13, "ours · named level", "both") in rows and (13, "diffusers FirstBlockCache", "FLUX.1") in rows
    assert any("pip install -r requirements-peers.txt" in line for line in report.skipped)
    assert not any("cache-dit" in r.method for r in report.rows)
    for row in report.rows:
        cost = row.tuning.cost[Pricing(row.pricing) if row.pricing != "both" else Pricing.PROXY]
        assert cost <= row.budget
    table = peers.format_peers_table(report.rows)
    assert "| 18 | ours · named level | both | go fast (o1) | 18.0 / 18.0 |" in table
    best = [r for r in report.rows if r.method == "ours · step map"]
    assert all(r.vs_best_map == (0, 0, 0.0) for r in best)  # against itself: every case a tie


@pytest.mark.parametrize(
    "schedule,chosen,order",
    [
        (StepSchedule.GO_FAST_FRONT_LOADED, WarmupSchedule(6, 2, 0, 1), 2),
        (StepSchedule.GO_REALLY_FAST_FRONT_LOADED, WarmupSchedule(5, 3, 0, 0), 3),
    ],
)
def test_the_front_loaded_schedules_are_the_step_maps_chosen_against_the_peers(schedule, chosen, order):
    """What docs/fidelity.md's peers table chose on the tuning set (map and order) is what flux offers by name."""
    for steps in (28, 50, 9):
        assert generate_compute_step_map(schedule, steps) == chosen.step_map(steps)
    assert sum(chosen.step_map(28)) in peers.BUDGETS and SCHEDULE_DEFAULT_ORDER[schedule] == order


def test_the_command_line_refuses_peers_with_the_single_image_options(capsys):
    with pytest.raises(SystemExit):
        fidelity.main(["--weights", str(PROXY), "--peers", "--quick"])
    assert "--peers runs on the synthetic cases" in capsys.readouterr().err


def test_cache_dit_dbcache_counts_its_probes_and_computes_everything_at_threshold_zero(proxy_editor, one_case):
    pytest.importorskip("cache_dit", reason=f"optional peer: {peer_methods.CACHE_DIT_REQUIREMENT}")
    case = one_case[0]
    exact, calls = final_tokens(proxy_editor, peer_methods.CacheDitDBCache(0.0, 4, -1, None), case)
    assert calls == [4] * 28
    torch.testing.assert_close(exact, sampling.pack(case.reference.latents), rtol=1e-5, atol=1e-5)
    for order in (None, 1):
        _, calls = final_tokens(proxy_editor, peer_methods.CacheDitDBCache(0.1, 4, -1, order), case)
        assert calls[:4] == [4] * 4 and set(calls[4:]) <= {1, 4} and 1 in calls  # F1B0: probes run block 0
