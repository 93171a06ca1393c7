"""The arithmetic behind docs/RESULTS.md's step-cost table and learning-rate ladder (the benchmarks themselves
are not run here)."""

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from results import next_lr  # noqa: E402
from step_flops import PRESETS, block_macs, sampling_ratio  # noqa: E402


@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_sampling_ratio_matches_enumerating_every_draw(gamma):
    c = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 7, "num_attention_heads": 2,
         "num_key_value_heads": 1, "vocab_size": 50}
    n, blk, head = 7, block_macs(c), 8 * 50
    assert blk == 2 * 8 * 8 + 2 * 8 * 4 * 1 + 3 * 8 * 16
    fwd = n * blk + head
    draws = list(itertools.combinations(range(n), gamma))
    bwd = sum(head + (n - 1 - min(d)) * blk + gamma * blk for d in draws) / len(draws)
    # the same integer MAC counts on both sides, a handful of float64 divisions and sums (u = 2**-53 each):
    # equal to a few ulps, ~1e-15 relative, far inside approx's default rel 1e-6
    assert sampling_ratio(c, gamma) == pytest.approx((fwd + bwd) / (3 * fwd))


def test_sampling_ratio_grows_with_gamma_and_stays_above_half():
    for c in PRESETS.values():
        ratios = [sampling_ratio(c, g) for g in (1, 2, 4, 8)]
        assert ratios == sorted(ratios) and ratios[0] > 0.5


@pytest.mark.parametrize("lr, up, want", [(3e-5, False, 1e-5), (1e-4, False, 3e-5), (3e-4, True, 1e-3),
                                          (1e-3, True, 3e-3), (1e-4, True, 3e-4)])
def test_next_lr_walks_the_1_3_10_ladder(lr, up, want):
    assert next_lr(lr, up) == pytest.approx(want)  # one float64 multiplication (x3 or x10/3): <= 2 ulps ~ 4e-16
