"""benchmarks/quality.py: the queue and one run end to end on a tiny model; benchmarks/harness.py: the ledger, the
claims and the statistics every experiment shares."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import quality  # noqa: E402
from tiny import save_tiny_model  # noqa: E402


@pytest.mark.parametrize("df,want", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_printed_tables(df, want):
    # the tables print 4 decimals; Simpson's rule on 2000 panels is far more accurate than that
    assert abs(harness.t_quantile(0.975, df) - want) < 6e-4


def test_paired_interval_by_hand():
    diffs = [0.01, 0.03, 0.02]  # mean 0.02, sd 0.01, n 3: half-width 4.3027 * 0.01 / sqrt(3)
    m, lo, hi = harness.paired_ci(diffs)
    half = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, 2) to 7 digits: the interval's half-width to ~1e-6 relative
    # the mean of 3 float64 values is exact to an ulp (isclose's default rel_tol 1e-9); the half-width uses
    # t_quantile (Simpson's rule, 4 decimals checked above: ~1e-4 relative), hence rel_tol 1e-3
    assert math.isclose(m, 0.02) and math.isclose(hi - m, half, rel_tol=1e-3) and math.isclose(m - lo, half,
                                                                                                  rel_tol=1e-3)
    assert harness.paired_ci([0.1]) is None
    assert "excl. 0" not in harness.fmt_ci((m, lo, hi), 4)  # [-0.0048, +0.0448]: three seeds are few
    assert "excl. 0" in harness.fmt_ci((0.02, 0.01, 0.03), 4)


def fake_run(arm, seed, lr, loss, acc=0.5):
    curve = [{"update": u, "train_cpu_s": 10.0 * u, "train_wall_s": 12.0 * u, "gsm_subset_loss": loss + 1 / u}
             for u in (50, 100, 150, 200)]
    return {"record": "run", "key": quality.run_key(arm, seed, lr), "arm": arm, "seed": seed, "lr": lr,
            "protocol_id": quality.protocol_id(), "git_commit": "0" * 40, "git_dirty_src": False,
            "figures": {"gsm_eval_loss": loss, "arith_accuracy": acc, "arith_n": 200, "gsm_n": 256, "curve": curve,
                        "updates": 200, "probe_passes": 4, "probe_cpu_s": 20.0, "train_cpu_s": 2000.0,
                        "train_wall_s": 2400.0, "cpu_s_per_update": 9.9, "distinct_blocks": 30}}


def test_ledger_is_append_only_skips_a_torn_line_and_the_queue_skips_recorded_runs(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    harness.append_record(fake_run("grass", 1, 3e-4, 1.0), ledger)
    with open(ledger, "a") as f:
        f.write('{"record": "run", "key": "torn')  # a killed append
    harness.append_record(fake_run("grass-uniform", 1, 3e-4, 0.9), ledger)
    runs = quality.runs_of(harness.read_jsonl(ledger))
    assert set(runs) == {quality.run_key("grass", 1, 3e-4), quality.run_key("grass-uniform", 1, 3e-4)}
    q = quality.queue(runs)
    first = [(arm, seed, lr) for _, arm, seed, lr in q[:4]]
    assert first == [("grass", 1, 3e-4), ("grass-uniform", 1, 3e-4), ("grass-static", 1, 3e-4), ("lisa", 1, 3e-4)]
    todo = [t for t in q if t[3] is not None and quality.run_key(*t[1:]) not in runs]
    assert todo[0][1:] == ("grass-static", 1, 3e-4)
    # a record of another protocol does not count
    other = fake_run("grass-static", 1, 3e-4, 1.0) | {"protocol_id": "elsewhere"}
    harness.append_record(other, ledger)
    assert quality.run_key("grass-static", 1, 3e-4) not in quality.runs_of(harness.read_jsonl(ledger))


def test_arms_of_the_papers_layout_stay_frozen_whatever_the_default():
    """The ledger's GRASS, control, GRASS* and variant runs froze the embeddings/head (the default when they ran);
    the default is now on, so those arms must pin it, and grass-head / LISA must train them."""
    for arm in ARMS_FROZEN:
        cfg = quality.arm_config(arm, 1, 3e-4)
        assert (cfg.train_embeddings, cfg.train_head) == (False, False), arm
    cfg = quality.arm_config("grass-head", 1, 3e-4)
    assert (cfg.train_embeddings, cfg.train_head) == (True, True)


ARMS_FROZEN = ("grass", "grass-uniform", "grass-static", "grass-trainprobe", "grass-relative")


def test_arms_of_the_papers_probe_stay_measuring_whatever_the_default():
    """The ledger's GRASS, GRASS*, relative-importance and grass-head runs used the paper's measuring probe (the
    default when they ran); the default is now the training probe, so those arms must pin it (a key of the arm,
    not the default), and the training-probe arm must train."""
    for arm in ARMS_MEASURE:
        assert quality.ARMS[arm][1].get("probe_mode") == "measure", arm
        assert quality.arm_config(arm, 1, 3e-4).probe_mode == "measure", arm
    assert quality.ARMS["grass-trainprobe"][1].get("probe_mode") == "train"
    assert quality.arm_config("grass-trainprobe", 1, 3e-4).probe_mode == "train"


ARMS_MEASURE = ("grass", "grass-static", "grass-relative", "grass-head")


def test_plan_prices_each_run_at_its_methods_recorded_cost():
    runs = {r["key"]: r for r in [fake_run("grass", 1, 3e-4, 1.0), fake_run("lisa", 1, 3e-4, 1.0)]}
    runs[quality.run_key("lisa", 1, 3e-4)]["figures"]["train_cpu_s"] = 1000.0
    runs[quality.run_key("lisa", 1, 3e-4)]["figures"]["eval_cpu_s"] = 500.0
    price = quality.arm_price(runs)
    assert price("grass-head") == 2000.0  # grass's method: its one run (no eval_cpu_s recorded)
    assert price("lisa") == 1500.0
    assert price("fft") == 1750.0  # no fft run yet: the mean of all runs
    assert quality.arm_price({}, fallback=9.0)("fft") == 9.0


def test_best_rate_waits_for_the_grid_and_variants_share_grass_rate():
    runs = {r["key"]: r for r in [fake_run("grass", 1, 3e-4, 1.0)]}
    assert quality.best_lr("grass", runs) is None and quality.best_lr("grass-static", runs) is None
    runs |= {r["key"]: r for r in [fake_run("grass", 1, 1e-4, 0.95)]}
    assert quality.best_lr("grass", runs) is None  # 1e-4 is the grid's lower end: the edge rule runs 3e-5 first
    runs |= {r["key"]: r for r in [fake_run("grass", 1, 3e-5, 0.97)]}
    assert quality.best_lr("grass", runs) == 1e-4 == quality.best_lr("grass-relative", runs)
    phases = {(ph[0], arm, seed, lr) for ph, arm, seed, lr in quality.queue(runs)}
    assert ("E", "grass", 2, 1e-4) in phases  # reruns at the better rate
    # the sampling arms a baseline must beat (LISA, grass-head) get their reruns before the others'
    runs |= {r["key"]: r for lr, loss in ((1e-4, 0.9), (3e-4, 1.0), (3e-5, 0.95))
             for r in [fake_run("lisa", 1, lr, loss)]}
    e = [(arm, seed) for ph, arm, seed, lr in quality.queue(runs) if ph[0] == "E"]
    # (LISA's seed 1 at 1e-4 is its grid's run, phase C)
    assert e[:5] == [("grass-head", 1), ("lisa", 2), ("grass-head", 2), ("lisa", 3), ("grass-head", 3)]
    assert e.index(("grass-head", 3)) < e.index(("grass", 2))


def test_a_best_rate_at_an_open_end_of_its_grid_runs_the_next_rate_before_it_counts():
    runs = {r["key"]: r for r in [fake_run("fft", 1, 1e-5, 0.90), fake_run("fft", 1, 3e-5, 0.73)]}
    assert quality.best_lr("fft", runs) is None  # 3e-5 is the top of FFT's grid, and that end is open
    q = [(ph[:2], arm, seed, lr) for ph, arm, seed, lr in quality.queue(runs)]
    assert ("C0", "fft", 1, 1e-4) in q and ("D ", "fft", 2, None) in q  # seeds 2-3 wait for the extended grid
    runs |= {r["key"]: r for r in [fake_run("fft", 1, 1e-4, 0.75)]}
    assert quality.best_lr("fft", runs) == 3e-5  # inside now; the rule adds one rate per end, never a second
    assert ("C0", "fft", 1, 1e-4) in [(ph[:2], a, s, lr) for ph, a, s, lr in quality.queue(runs)]
    runs[quality.run_key("fft", 1, 1e-4)]["figures"]["gsm_eval_loss"] = 0.70
    assert quality.best_lr("fft", runs) == 1e-4
    # no end is closed (FFT's own grid refuted the 20-step sweep's verdicts): GRASS's best at the top of its grid
    # calls for 1e-3, and the variants, which share GRASS's rate, wait with it
    runs = {r["key"]: r for r in [fake_run("grass", 1, 1e-4, 0.9), fake_run("grass", 1, 3e-4, 0.8)]}
    assert quality.seed1_grid("grass", runs) == (1e-4, 3e-4, 1e-3)
    assert quality.best_lr("grass", runs) is None is quality.best_lr("grass-trainprobe", runs)
    runs |= {r["key"]: r for r in [fake_run("grass", 1, 1e-3, 0.85)]}
    assert quality.best_lr("grass", runs) == 3e-4 == quality.best_lr("grass-trainprobe", runs)
    # the lower ends too: a best at 1e-4 calls for 3e-5 (and the variants wait with GRASS)
    runs[quality.run_key("grass", 1, 1e-4)]["figures"]["gsm_eval_loss"] = 0.7
    assert quality.seed1_grid("grass", runs) == (3e-5, 1e-4, 3e-4)
    assert quality.best_lr("grass", runs) is None is quality.best_lr("grass-relative", runs)


def test_a_baseline_ahead_of_the_best_sampling_arms_gets_seeds_4_and_5_and_its_seeds_come_before_the_variants():
    runs = {}
    for arm, lrs in quality.GRID.items():
        for lr in quality.seed1_grid(arm, runs):
            runs |= {r["key"]: r for r in [fake_run(arm, 1, lr, 1.0 if lr == min(quality.GRID[arm]) else 0.9)]}
    for arm in quality.GRID:  # each grid's best at its top: the edge rule's rate, a little worse
        extra = quality.beyond_edge(arm, runs)
        runs |= {r["key"]: r for r in [fake_run(arm, 1, extra, 0.95)]}
    assert quality.best_lr("fft", runs) == 3e-5 and quality.best_lr("lisa", runs) == 3e-4
    q = [(ph[0], arm, seed) for ph, arm, seed, lr in quality.queue(runs)]
    assert q.index(("D", "fft", 2)) < q.index(("C", "lisa", 1)) < q.index(("C", "grass", 1)) \
        < q.index(("B", "grass-trainprobe", 1))
    for seed in (2, 3):
        for arm, loss in (("fft", 0.80), ("lisa", 0.9), ("grass-head", 0.9)):
            lr = quality.best_lr(arm, runs)
            runs |= {r["key"]: r for r in [fake_run(arm, seed, lr, loss)]}
    runs |= {r["key"]: r for r in [fake_run("grass-head", 1, 3e-4, 0.9)]}
    assert "fft" in quality.deciding(runs)  # ahead of LISA and grass-head over seeds 1-3 (0.9, 0.8, 0.8 vs 0.9)
    q = [(ph[0], arm, seed) for ph, arm, seed, lr in quality.queue(runs)]
    assert q.index(("F", "fft", 5)) < q.index(("B", "grass-trainprobe", 1))  # `method` before the variants' keys
    runs[quality.run_key("fft", 2, 3e-5)]["figures"]["gsm_eval_loss"] = 1.2
    assert "fft" not in quality.deciding(runs)  # behind on the mean: it decides nothing, no more seeds


def test_a_variant_gets_seeds_4_and_5_when_ahead_of_grass_or_when_its_rule_lets_a_tie_win():
    runs = {}
    for lr, loss in ((1e-4, 0.9), (3e-4, 0.8), (1e-3, 0.95)):  # GRASS's grid: best 3e-4, inside
        runs |= {r["key"]: r for r in [fake_run("grass", 1, lr, loss)]}
    grass = {1: 0.80, 2: 0.82, 3: 0.78}
    runs |= {r["key"]: r for s in (2, 3) for r in [fake_run("grass", s, 3e-4, grass[s])]}

    def variant(arm, diffs):
        return {r["key"]: r for s, d in zip((1, 2, 3), diffs) for r in [fake_run(arm, s, 3e-4, grass[s] + d)]}

    # behind on the mean, interval across 0: a tie -- the training probe's rule lets it win, relative's does not
    tie = variant("grass-trainprobe", (0.03, -0.02, 0.01)) | variant("grass-relative", (0.03, -0.02, 0.01))
    arms = quality.deciding(runs | tie)
    assert "grass-trainprobe" in arms and "grass-relative" not in arms
    # clearly behind (interval above 0): neither
    behind = variant("grass-trainprobe", (0.05, 0.06, 0.055)) | variant("grass-relative", (0.05, 0.06, 0.055))
    assert not {"grass-trainprobe", "grass-relative"} & set(quality.deciding(runs | behind))
    # ahead on the mean: both, whatever the interval
    ahead = variant("grass-trainprobe", (-0.01, 0.005, -0.01)) | variant("grass-relative", (-0.01, 0.005, -0.01))
    assert {"grass-trainprobe", "grass-relative"} <= set(quality.deciding(runs | ahead))
    f = [(arm, seed) for ph, arm, seed, lr in quality.queue(runs | tie) if ph.startswith("F")]
    assert ("grass-trainprobe", 4) in f and ("grass-trainprobe", 5) in f and ("grass-relative", 4) not in f


def test_a_default_candidate_whose_best_is_the_edge_rules_rate_gets_one_more_rate_for_lr_only():
    runs = {}
    for arm, lrs in quality.GRID.items():  # every grid's best at its top end, then the edge rule's rate
        for lr in lrs:
            runs |= {r["key"]: r for r in [fake_run(arm, 1, lr, 1.0 if lr == min(lrs) else 0.9)]}
        runs |= {r["key"]: r for r in [fake_run(arm, 1, quality.beyond_edge(arm, runs), 0.95)]}
    runs[quality.run_key("fft", 1, 1e-4)]["figures"]["gsm_eval_loss"] = 0.6  # FFT's best: its extension, 1e-4
    for seed in (2, 3):
        runs |= {r["key"]: r for arm, lr, loss in (("fft", 1e-4, 0.6), ("lisa", 3e-4, 0.9), ("grass-head", 3e-4, 0.9))
                 for r in [fake_run(arm, seed, lr, loss)]}
    runs |= {r["key"]: r for r in [fake_run("grass-head", 1, 3e-4, 0.9)]}
    assert "fft" in quality.deciding(runs) and quality.best_lr("fft", runs) == 1e-4
    assert quality.lr_check("fft", runs) == 3e-4 and quality.lr_check("lora", runs) is None  # LoRA decides nothing
    g = [(arm, seed, lr) for ph, arm, seed, lr in quality.queue(runs) if ph.startswith("G")]
    assert g == [("fft", 1, 3e-4)]
    assert quality.default_rate("fft", runs) is None  # waits for phase G's run
    runs |= {r["key"]: r for r in [fake_run("fft", 1, 3e-4, 0.55)]}
    assert quality.default_rate("fft", runs) == 3e-4  # read for `lr`; the method's seeds stay at 1e-4
    assert quality.best_lr("fft", runs) == 1e-4
    assert {r["lr"] for r in quality.chosen_runs(runs)["fft"].values()} == {1e-4}
    runs[quality.run_key("fft", 1, 3e-4)]["figures"]["gsm_eval_loss"] = 0.7
    assert quality.default_rate("fft", runs) == 1e-4
    # a best inside the extended grid needs no check
    runs[quality.run_key("fft", 1, 3e-5)]["figures"]["gsm_eval_loss"] = 0.5
    assert quality.lr_check("fft", runs) is None and quality.default_rate("fft", runs) == 3e-5


def test_an_incomplete_grid_shows_the_arm_at_its_best_rate_so_far():
    runs = {r["key"]: r for r in [fake_run("fft", 1, 1e-5, 0.90), fake_run("fft", 1, 3e-5, 0.73)]}
    assert quality.best_lr("fft", runs) is None  # waits for 1e-4 (edge rule)
    assert {r["lr"] for r in quality.chosen_runs(runs)["fft"].values()} == {3e-5}


def test_a_stop_file_drains_the_queue_before_its_next_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "WORK", tmp_path)
    ledger = tmp_path / "ledger.jsonl"
    harness.append_record({"record": "base", "key": f"base|protocol={quality.protocol_id()}"}, ledger)
    (tmp_path / "stop").touch()
    monkeypatch.setattr(quality, "child", lambda *a: pytest.fail("a run started despite the stop file"))
    quality.cmd_run(ledger, None, None)
    assert "[stop]" in capsys.readouterr().out and not list(tmp_path.glob("*.claim"))


def test_report_from_the_ledger_alone(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    for seed, (g, u) in enumerate([(1.00, 0.98), (1.02, 0.99), (0.99, 0.97)], start=1):
        harness.append_record(fake_run("grass", seed, 3e-4, g), ledger)
        harness.append_record(fake_run("grass-uniform", seed, 3e-4, u), ledger)
        harness.append_record(fake_run("lisa", seed, 3e-4, u + 0.1), ledger)
    quality.cmd_report(ledger, tmp_path / "docs")
    md = (tmp_path / "docs" / "quality.md").read_text()
    assert "**Partial until every planned run is in.**" in md and "Complete" not in md  # a few runs of the plan
    row = next(line for line in md.splitlines() if line.startswith("| GRASS − uniform control"))
    # paired differences +0.02, +0.03, +0.02: every seed worse, the interval excludes 0
    assert "+0.0233" in row and "excl. 0" in row
    # the targets say which comparator trains the embeddings/head and which does not
    targets = md.split("## Targets")[1].split("##")[0]
    lisa_row = next(line for line in targets.splitlines() if "below LISA" in line)
    control_row = next(line for line in targets.splitlines() if "below uniform control" in line)
    assert "layouts differ: embeddings/head frozen here, trained in LISA" in lisa_row
    assert "layouts differ" not in control_row
    assert (tmp_path / "docs" / "quality_updates.png").is_file() and (tmp_path / "docs" / "quality_cpu.png").is_file()


def test_one_run_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "tiny", layers=4)
    monkeypatch.setitem(quality.PROTOCOL, "model", str(model_dir))
    monkeypatch.setitem(quality.PROTOCOL, "max_steps", 4)
    monkeypatch.setitem(quality.PROTOCOL, "train_samples", 16)
    monkeypatch.setitem(quality.PROTOCOL, "probe_steps", 1)
    monkeypatch.setitem(quality.PROTOCOL, "gamma", 2)
    monkeypatch.setitem(quality.PROTOCOL, "data", "easy_arith")  # char-level tokens: GSM prompts fill 64
    monkeypatch.setattr(quality, "EVAL_SETS", {"gsm": ("easy_arith", 4, 11), "arith": ("easy_arith", 4, 12)})
    monkeypatch.setattr(quality, "CURVE_EVERY", 2)
    monkeypatch.setattr(quality, "CURVE_SUBSET", 2)
    monkeypatch.setattr(quality, "MAX_NEW_TOKENS", 2)
    rec = quality.one_run("grass", 1, 1e-3)
    f = rec["figures"]
    assert f["updates"] == 4 and f["probe_passes"] == 1  # equal updates: the probe comes on top
    assert [p["update"] for p in f["curve"]] == [2, 4]
    assert f["train_cpu_s"] > f["probe_cpu_s"] > 0 and math.isfinite(f["gsm_eval_loss"])
    assert rec["config"]["count_probe_steps"] is False and rec["config"]["method"] == "grass"
    json.dumps(rec)  # a ledger line


def test_a_claimed_run_is_skipped_by_another_queue_and_a_dead_queues_claim_is_free(tmp_path):
    """A claim is a flock (harness.try_lock): another queue cannot take it while its holder lives, and the kernel
    drops it when the holder dies (a killed queue leaves no stale claim)."""
    path = harness.claim_path(tmp_path, "k")
    held = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import harness; "
                             "f = harness.try_lock(harness.claim_path(__import__('pathlib').Path(sys.argv[2]), 'k')); "
                             "print(f is not None, flush=True); sys.stdin.read()",
                             str(BENCH), str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "True"  # the other queue holds it
        assert harness.try_lock(path) is None
    finally:
        held.kill()
        held.wait()
    mine = harness.try_lock(path)  # its queue died: the claim is free
    assert mine is not None and harness.try_lock(path) is None  # and now held here: a second queue skips it
    mine.close()
    assert harness.try_lock(path) is not None


def test_equal_cpu_comparison_interpolates_fft_at_each_arms_budget():
    """An arm that spent 150 CPU-s is set against FFT's curve at 150 s: halfway between its points at 100 s (loss
    1.0) and 200 s (0.8), so 0.9; the arm's 0.85 and 0.95 on two seeds are 0.05 ahead and 0.05 behind."""
    def rec(points):
        return {"figures": {"curve": [{"train_cpu_s": c, "gsm_subset_loss": v} for c, v in points]}}

    fft = {s: rec([(0, 1.2), (100, 1.0), (200, 0.8)]) for s in (1, 2)}
    arm = {1: rec([(0, 1.2), (150, 0.85)]), 2: rec([(0, 1.2), (150, 0.95)])}
    lines = quality.fft_at_equal_cpu({"fft": fft, "lisa": arm})
    row = next(ln for ln in lines if ln.startswith("| LISA"))
    # mean 0 (to rounding: the sign of -0.0000 is float noise), sd 0.0707, half-width t(0.975, 1) * 0.05 = 0.6353
    assert re.search(r"\| 1,2 \| [+-]0\.0000 \[-0\.6353, \+0\.6353\] \| 1 of 2 \|$", row), row
    # an arm whose budget runs past FFT's last point has nothing to compare with: no row
    assert quality.fft_at_equal_cpu({"fft": fft, "lisa": {s: rec([(0, 1.2), (300, 0.5)]) for s in (1, 2)}}) == []
