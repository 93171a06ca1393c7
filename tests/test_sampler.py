"""The functional core of the sampler and its schedule, without a model.

Tolerances: the sampler computes in float64 (u = 2**-53 ~ 1.1e-16) over a handful of values, so every result below
is within a few ulps (~1e-15 relative) of the exact one, and assert_close's float64 default (rtol 1e-7, atol 1e-7)
and approx's rel 1e-6 are pure headroom; float32 inputs (the ema test) are small binary fractions, exact.
"""

import pytest
import torch

from grass_ft.method.importance import MGNWindow, grad_rms
from grass_ft.method.sampler import LayerSampler, draw, ema, log_probs, normalize_mgn, softmax_probs


def test_normalize_is_scale_free():
    m = torch.tensor([1e-4, 2e-4, 3e-4, 2e-4])
    z = normalize_mgn(m)
    torch.testing.assert_close(z.mean(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(normalize_mgn(m * 1000), z)
    torch.testing.assert_close(normalize_mgn(torch.zeros(3)), torch.ones(3, dtype=torch.float64))


def test_softmax_tau_limits():
    m = torch.tensor([1e-3, 5e-3, 2e-3, 4e-3, 3e-3])
    uniform = softmax_probs(m, tau=1e9)
    torch.testing.assert_close(uniform, torch.full((5,), 0.2, dtype=torch.float64))
    peaked = softmax_probs(m, tau=1e-6)
    assert peaked.argmax() == 1 and peaked[1] > 1 - 1e-9
    p = softmax_probs(m, tau=1.0)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert p.argsort().tolist() == m.argsort().tolist()  # order preserved
    # the raw-MGN softmax would be uniform; the normalised one is not
    assert p.max() / p.min() > 2


def test_draw_distinct_sorted_and_tau_zero_is_top_gamma():
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([1.0, 9.0, 2.0, 8.0, 3.0, 7.0])
    for _ in range(50):
        d = draw(log_probs(m, 1.0), 3, g)
        assert d == sorted(set(d)) and len(d) == 3
    assert draw(log_probs(m, 1e-8), 3, g) == [1, 3, 5]
    with pytest.raises(ValueError, match="cannot draw 7 distinct blocks out of 6"):
        draw(log_probs(m, 1.0), 7, g)


def test_draw_frequencies_follow_probs():
    # With k=1 the draw is a plain categorical: frequencies approach p.
    g = torch.Generator().manual_seed(1)
    m = torch.tensor([1.0, 2.0, 3.0, 4.0])
    p = softmax_probs(m, 0.5)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts[draw(log_probs(m, 0.5), 1, g)[0]] += 1
    # a statistical bound, not a rounding one: a frequency over n = 4000 draws has sigma <= sqrt(0.25 / 4000) =
    # 0.0079, and 0.03 is 3.8 sigma; the seeded generator makes the draws the same on every CPU (integer RNG)
    torch.testing.assert_close(counts / n, p.float(), atol=0.03, rtol=0)


def test_draw_same_seed_same_blocks():
    m = torch.rand(30)
    a = [draw(log_probs(m, 1.0), 4, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_ema_only_observed():
    old = torch.tensor([1.0, 2.0, 3.0])
    new = torch.tensor([3.0, 0.0, 5.0])
    out = ema(old, new, 0.25, torch.tensor([True, False, True]))
    torch.testing.assert_close(out, torch.tensor([1.5, 2.0, 3.5]))


def test_window_mean_counts_only_observed_steps():
    w = MGNWindow(3)
    w.add({0: 1.0, 2: 4.0})
    w.add({0: 3.0})
    torch.testing.assert_close(w.mean(), torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    assert w.observed().tolist() == [True, False, True]
    assert grad_rms(16.0, 4) == 2.0


def _run(s: LayerSampler, steps: int):
    out = {}
    for t in range(steps):
        ev = s.begin_step(t)
        out[t] = [e["event"] for e in ev]
        if s.in_probe(t):
            s.observe({b: 1.0 + b for b in range(s.num_blocks)})
        else:
            s.observe({b: 10.0 for b in s.active})
    return out


def test_schedule_adaptive():
    s = LayerSampler("adaptive", num_blocks=6, gamma=2, probe_steps=3, sample_interval=4, update_interval=6, seed=0)
    ev = _run(s, 20)
    assert ev[0] == ev[1] == ev[2] == []
    assert ev[3] == ["probe", "draw"]
    assert {t for t, e in ev.items() if "draw" in e} == {3, 7, 11, 15, 19}
    assert {t for t, e in ev.items() if "refresh" in e} == {9, 15}
    assert ev[15] == ["refresh", "draw"]


def test_refresh_changes_only_observed_blocks():
    s = LayerSampler("adaptive", num_blocks=6, gamma=2, probe_steps=2, sample_interval=100, update_interval=3,
                     alpha=0.5, seed=0)
    _run(s, 3)  # probe, then the first draw at step 2
    mgn_before = s.mgn.clone()
    active = list(s.active)
    for t in range(3, 5):
        s.begin_step(t)
        s.observe({b: 10.0 for b in active})
    s.begin_step(5)  # refresh
    changed = (s.mgn != mgn_before).nonzero().flatten().tolist()
    assert changed == active
    for b in active:
        assert s.mgn[b].item() == pytest.approx(0.5 * 10.0 + 0.5 * mgn_before[b].item())


def test_static_never_refreshes_and_uniform_has_no_probe():
    st = LayerSampler("static", num_blocks=6, gamma=2, probe_steps=2, sample_interval=2, update_interval=2, seed=0)
    ev = _run(st, 30)
    assert not any("refresh" in e for e in ev.values())
    probs = st.probs.clone()
    assert probs.max() > probs.min()  # from the probe, not uniform
    un = LayerSampler("uniform", num_blocks=6, gamma=2, probe_steps=5, sample_interval=3, seed=0)
    ev = _run(un, 10)
    assert ev[0] == ["draw"] and not any("probe" in e or "refresh" in e for e in ev.values())
    torch.testing.assert_close(un.probs, torch.full((6,), 1 / 6, dtype=torch.float64))
    assert un.mgn.abs().sum() == 0


def test_state_dict_roundtrip_continues_identically():
    a = LayerSampler("adaptive", num_blocks=8, gamma=3, probe_steps=2, sample_interval=2, update_interval=4, seed=3)
    _run(a, 7)
    b = LayerSampler("adaptive", num_blocks=8, gamma=3, probe_steps=2, sample_interval=2, update_interval=4, seed=99)
    b.load_state_dict(a.state_dict())
    for t in range(7, 20):
        a.begin_step(t)
        b.begin_step(t)
        assert a.active == b.active
        a.observe({x: float(x) for x in a.active})
        b.observe({x: float(x) for x in b.active})
    torch.testing.assert_close(a.mgn, b.mgn)
    with pytest.raises(ValueError, match="kind 'adaptive'"):
        LayerSampler("static", num_blocks=8, gamma=3, probe_steps=2).load_state_dict(a.state_dict())
