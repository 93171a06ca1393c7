"""benchmarks/frontier.py: the template split, the queue's order and its ledger-driven items, record keys, the
intervals and the method=auto order, the Q4_1 noise model and the forgetting set's hash. No training."""

import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import frontier as fr  # noqa: E402
import frontier_protocol as fp  # noqa: E402
import frontier_report as rep  # noqa: E402
import frontier_data as fd  # noqa: E402

S = fp.Setting


def test_templates_split_three_ways_without_overlap_and_problems_keep_to_their_part():
    import reasoning_gym

    split = fd.template_split()
    parts = [set(split[p]) for p in ("train", "validation", "test")]
    assert [len(p) for p in parts] == [55, 15, 15]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(fd.gsm_templates()) and len(fd.gsm_templates()) == 85
    assert fd.template_split() == split  # a fixed seed: the same split in every process
    fd.register()
    for part in ("train", "test"):
        items = reasoning_gym.create_dataset(fd.SPLIT_DATASET, size=40, seed=5, split=part)
        assert {item["metadata"]["template"] for item in items} <= set(split[part])
    with pytest.raises(ValueError, match="expected 85 templates, got 3"):
        fd.template_split((1, 2, 3))


def fake(s, seed, lr, test=1.0, val=None, cpu=1000.0, acc=0.5, load=None):
    curve = [{"update": u, "train_cpu_s": cpu * u / s.updates, "train_wall_s": cpu, "test_subset_loss": test + 1 / u}
             for u in range(100, s.updates + 1, 100)]
    figures = {"test_loss": test, "test_number_loss": test / 2, "test_subset_loss": test, "validation_loss":
               test if val is None else val, "validation_number_loss": 0.1, "seen_loss": test - 0.1, "seen_number_loss":
               0.1, "acc_loss": 0.5, "acc_number_loss": 0.5, "acc_accuracy": acc, "acc_n": 200, "prose_loss": 3.0,
               "curve": curve, "updates": s.updates, "train_cpu_s": cpu, "train_wall_s": cpu, "eval_cpu_s": 600.0,
               "cpu_s_per_update": cpu / s.updates, **({} if load is None else {"others_load": load})}
    return {"record": "run", "key": fp.run_key(s, seed, lr), "arm": s.arm, "gamma": s.gamma, "lora_r": s.lora_r,
            "updates": s.updates, "seed": seed, "lr": lr, "protocol_id": fp.protocol_id(), "git_commit": "0" * 40,
            "figures": figures}


def ledger(*recs):
    return fp.runs_of(list(recs))


CPU = {"grass-uniform": 1000.0, "fft": 1500.0, "lora": 1300.0, "grass": 1010.0, "lisa": 1050.0, "badam": 1000.0,
       "grass-uniform-reset": 1000.0}


def grids(val=None):
    """Every grid at seed 1 with its middle rate best (so no edge rate), at the arms' costs :data:`CPU`."""
    out = []
    for arm, grid in fp.GRID.items():
        middle = sorted(grid)[1]
        out += [fake(S(arm), 1, lr, val=(val or {}).get((arm, lr), 1.0 if lr == middle else 1.1), cpu=CPU[arm])
                for lr in grid]
    return out


def test_queue_starts_with_the_current_rates_then_waits_for_the_grids():
    q = fp.queue({})
    first = [(s.arm, lr) for _, s, _, lr in q[:3]]
    assert first == [("fft", 1e-4), ("grass-uniform", 3e-4), ("lora", 1e-3)]
    assert [t[0][0] for t in q[:9]] == ["L"] * 9
    main = [t for t in q if t[0].startswith("M")]
    assert main and all(t[3] is None for t in main)  # every main run waits for its rate
    timed = [t for t in q if t[0].startswith("T")]
    assert timed and all(t[1].updates == 0 and not fp.runnable(t) for t in timed)  # their length needs the costs


def test_rates_come_from_the_validation_split_and_the_edge_rule_extends_the_grid_while_its_end_wins():
    runs = ledger(*grids())
    assert fp.best_lr("fft", runs) == 1e-4 and fp.best_lr("grass-uniform", runs) == 3e-4
    assert fp.best_lr("badam", runs) == fp.best_lr("grass-uniform", runs)  # it shares the layer-wise default's
    # the seed-1 main runs at the chosen rate are the grid's runs: not queued twice
    q = fp.queue(runs)
    assert sum(1 for _, s, seed, _ in q if s == S("fft") and seed == 1) == 3  # its three rates, once each
    # FFT's best at the top of its grid: one more rate past it, and no rate until that one is in
    runs = ledger(*grids({("fft", 3e-4): 0.9}))
    assert fp.seed1_grid("fft", runs) == (1e-4, 3e-5, 3e-4, 1e-3) and fp.best_lr("fft", runs) is None
    # fourth amendment: a best at the end of the extended grid gets the next rate past it, up to three past an end
    low = {("fft", 3e-5): 0.9}
    runs = ledger(*grids(low), fake(S("fft"), 1, 1e-5, val=0.8))
    assert fp.seed1_grid("fft", runs) == (1e-4, 3e-5, 3e-4, 1e-5, 3e-6) and fp.best_lr("fft", runs) is None
    runs = ledger(*grids(low), fake(S("fft"), 1, 1e-5, val=0.8), fake(S("fft"), 1, 3e-6, val=0.85))
    assert fp.best_lr("fft", runs) == 1e-5  # interior now: no further rate
    q = fp.queue(runs)
    assert not any(s == S("fft") and lr == 1e-6 for _, s, _, lr in q)
    runs = ledger(*grids(low), *(fake(S("fft"), 1, lr, val=v) for lr, v in ((1e-5, 0.8), (3e-6, 0.7), (1e-6, 0.6))))
    assert fp.seed1_grid("fft", runs)[-3:] == (1e-5, 3e-6, 1e-6) and fp.best_lr("fft", runs) == 1e-6  # the cap
    assert "| FFT | " in (md := "\n".join(rep.grid_md(runs))) and "1e-06 (at the edge" in md  # reported as such
    inside = ledger(*grids(low), fake(S("fft"), 1, 1e-5, val=0.8), fake(S("fft"), 1, 3e-6, val=0.85))
    assert "(at the edge" not in "\n".join(rep.grid_md(inside))
    # test loss is never read for the rate: a better test figure at another rate changes nothing
    runs = ledger(*(g if (g["arm"], g["lr"]) != ("lora", 3e-3) else fake(S("lora"), 1, 3e-3, test=0.1, val=1.1)
                    for g in grids()))
    assert fp.best_lr("lora", runs) == 1e-3


def cost(s, rnd, cpu_per_update, load=0.0):
    """A cost benchmark's measurement (``frontier.py costs``)."""
    return {"record": "cost", "key": f"cost|{fp.run_key(s, 1, fp.COST_LR)}|round={rnd}", "round": rnd, "arm": s.arm,
            "gamma": s.gamma, "lora_r": s.lora_r, "protocol_id": fp.protocol_id(), "cpu_s_per_update": cpu_per_update,
            "others_load": load}


def costs(rounds=(1, 2, 3)):
    """Rounds of the cost benchmark: every main arm at :data:`CPU`'s cost / 500."""
    return [cost(S(arm), rnd, CPU[arm] / 500) for rnd in rounds for arm in fp.MAIN]


def test_time_matched_updates_follow_the_side_by_side_costs():
    recs = grids()
    assert fp.matched_updates(S("fft"), ledger(*recs)) is None  # no cost measured yet: the time-matched runs wait
    assert fp.matched_updates(S("fft"), ledger(*recs, *costs((1, 2)))) is None  # nor after two rounds
    recs += costs()  # three rounds: FFT 1.5 x the reference, LISA 1.05 x, LoRA 1.3 x
    runs = ledger(*recs)
    assert fp.matched_updates(S("fft"), runs) == round(500 / 1.5) == 333
    assert fp.matched_updates(S("lisa"), runs) == 0  # within 10 %: its own 500 updates are the equal-time figure
    q = fp.queue(runs)
    tm = [(s, seed) for ph, s, seed, _ in q if ph.startswith("T") and s.updates]
    assert (S("fft", updates=333), 1) in tm and not any(s.arm == "lisa" for s, _ in tm)
    assert fp.matched_updates(S("lora"), runs) == round(500 / 1.3) == 385
    assert fp.equal_time_setting(S("fft"), runs) == S("fft", updates=333)
    assert fp.equal_time_setting(S("lisa"), runs) == S("lisa")
    # the runs' own clocks never move it: an FFT run that cost 3x the reference's leaves the ratio as measured
    assert fp.matched_updates(S("fft"), ledger(*recs, fake(S("fft"), 2, 1e-4, cpu=3000.0))) == 333
    # sized once: a fourth round that would move the ratio (FFT 2x) resizes nothing the first three sized
    later = ledger(*recs, cost(S("grass-uniform"), 4, 2.0), cost(S("fft"), 4, 4.0))
    assert fp.cost_ratio(S("fft"), later)[1] == 4 and fp.cost_ratio(S("fft"), later)[0] > 1.5
    assert fp.matched_updates(S("fft"), later) == 333


def test_a_settings_cost_is_its_ratio_to_the_reference_round_by_round_and_busy_measurements_do_not_count():
    recs = grids()
    # round 1: the VM slow (both 2x); round 2: fast. The ratio pairs each with the reference's in its round
    recs += [cost(S("grass-uniform"), 1, 4.0), cost(S("fft"), 1, 6.0), cost(S("grass-uniform"), 2, 2.0),
             cost(S("fft"), 2, 3.0 * 1.21)]
    runs = ledger(*recs)
    ratio, rounds = fp.cost_ratio(S("fft"), runs)
    assert rounds == 2 and math.isclose(ratio, math.sqrt(1.5 * 1.5 * 1.21))  # geometric mean of 1.5 and 1.815
    # a measurement with the machine busy is not read; a round without the reference gives no ratio
    busy = cost(S("fft"), 3, 99.0, load=0.5)
    assert fp.cost_ratio(S("fft"), ledger(*recs, busy, cost(S("fft"), 4, 99.0))) == (ratio, 2)
    assert fp.cost_ratio(S("lora"), runs) is None and fp.matched_updates(S("lora"), runs) is None
    # the equal-time budget is the reference's own clocks over seeds 1-3 at its rate; a setting's is that x ratio
    assert fp.train_cpu(S("fft"), runs) is None  # the reference's seeds 2-3 are not in
    recs += [fake(S("grass-uniform"), s, 3e-4, cpu=1100.0) for s in (2, 3)]  # seed 1's grid run: 1000
    runs = ledger(*recs)
    assert math.isclose(fp.train_cpu(S("fft"), runs), ratio * 3200 / 3)
    md = rep.report_md(recs)
    assert f"{ratio:.3f} (2 rounds)" in md and "Cost rounds recorded: 2." in md
    assert f"| FFT | 6.000 | 3.630 | {ratio:.3f} (2 rounds) |" in md  # the measurements, round by round


def test_the_others_load_counts_another_process_and_this_ones_own_time_is_in_the_machines():
    import subprocess
    import time

    if fr.busy_cpu_s() is None:
        pytest.skip("no /proc/stat here")
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"
    b0, c0 = fr.busy_cpu_s(), time.process_time()
    subprocess.run([sys.executable, "-c", spin], timeout=120)  # this process sleeps while the child spins
    assert fr.busy_cpu_s() - b0 - (time.process_time() - c0) >= 1.2  # background load only adds to it
    b0, c0 = fr.busy_cpu_s(), time.process_time()
    t = time.process_time()
    while time.process_time() - t < 1.0:
        pass
    assert fr.busy_cpu_s() - b0 >= (time.process_time() - c0) - 0.05  # one tick of 10 ms per CPU, and slack


def test_a_pause_file_holds_a_run_between_two_steps(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(fr, "WORK", tmp_path)
    assert fr.wait_while_paused(poll_s=0.05) == 0.0
    (tmp_path / "pause").touch()
    threading.Timer(0.3, (tmp_path / "pause").unlink).start()
    assert fr.wait_while_paused(poll_s=0.05) >= 0.25 and not (tmp_path / "pause").exists()


def test_method_auto_follows_the_frontier_once_its_ledger_has_decided():
    from grass_ft.planner import table
    from harness import read_jsonl

    records = read_jsonl(fp.LEDGER)
    eq = rep.at_equal_time(fp.runs_of(records))
    decided = rep.order_decided(eq)
    assert table.AUTO_ORDER_FROM_FRONTIER == decided, (
        "the frontier's rule 1 has decided (docs/results/frontier.md): copy its order into FRONTIER_ORDER "
        "(grass_ft.planner.table) as docs/RESULTS.md's amendment says, then set AUTO_ORDER_FROM_FRONTIER = True"
        if decided else "AUTO_ORDER_FROM_FRONTIER is True but the committed ledger has not decided")
    if decided:  # the planner walks exactly the ledger's order
        assert table.FRONTIER_ORDER == rep.auto_order(records)
    # the decision needs every main arm's three seeds at equal time, not fewer
    assert not rep.order_decided({S(arm): {1: {}, 2: {}} for arm in fp.MAIN})
    assert rep.order_decided({S(arm): {1: {}, 2: {}, 3: {}} for arm in fp.MAIN})


def test_record_keys_name_every_coordinate_and_the_protocol():
    key = fp.run_key(S("grass-uniform", gamma=8), 2, 3e-4)
    assert key == f"grass-uniform|gamma=8|r=None|updates=500|seed=2|lr=0.0003|protocol={fp.protocol_id()}"
    assert S("grass-uniform").gamma == 4 and S("lora").lora_r == 32 and S("fft").gamma is None
    assert fp.run_key(S("lora", lora_r=64), 1, 1e-3) != fp.run_key(S("lora"), 1, 1e-3)
    assert fp.run_key(S("fft", updates=333), 1, 1e-4) != fp.run_key(S("fft"), 1, 1e-4)
    rec = fake(S("badam", gamma=2), 1, 3e-4)
    assert fp.setting_of(rec) == S("badam", gamma=2) and set(fp.runs_of([rec])) == {rec["key"]}
    assert not fp.runs_of([rec | {"protocol_id": "elsewhere"}])


def test_single_seed_interval_uses_the_pooled_sd_and_paired_seeds_the_t_interval():
    sd, df = rep.pooled_sd([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [5.0]])  # variances 1 and 4, 2 df each
    assert df == 4 and math.isclose(sd, math.sqrt(2.5))
    a, b = {1: {"figures": {"x": 1.0}}}, {1: {"figures": {"x": 0.5}}}
    m, lo, hi = rep.difference(a, b, "x", (sd, df))
    half = 2.7764 * math.sqrt(2) * math.sqrt(2.5)  # t(0.975, 4) from the printed tables
    assert math.isclose(m, 0.5) and math.isclose(hi - m, half, rel_tol=2e-4) and math.isclose(m - lo, half,
                                                                                                rel_tol=2e-4)
    a = {s: {"figures": {"x": v}} for s, v in zip((1, 2, 3), (1.01, 1.03, 1.02))}
    b = {s: {"figures": {"x": 1.0}} for s in (1, 2, 3)}
    m, lo, hi = rep.difference(a, b, "x", (sd, df))  # paired: mean 0.02, sd 0.01, t(0.975, 2) = 4.3027
    assert math.isclose(m, 0.02) and math.isclose(hi - m, 4.3027 * 0.01 / math.sqrt(3), rel_tol=2e-4)


def test_auto_order_groups_unresolved_differences_and_puts_the_leaner_setting_first():
    def runs(*losses):
        return {s: {"figures": {"test_loss": v, "cpu_s_per_update": 3.0}} for s, v in zip((1, 2, 3), losses)}

    eq = {S("fft"): runs(0.60, 0.61, 0.62), S("grass-uniform"): runs(0.605, 0.62, 0.615),
          S("lora"): runs(0.70, 0.71, 0.72)}
    memory = {S("fft"): 100.0, S("grass-uniform"): 20.0, S("lora"): 15.0}
    order = rep.preference(eq, None, memory, {})
    # FFT and grass-uniform are not resolved (+0.0033 [-0.0149, +0.0216]): one group, the leaner first; LoRA is
    # behind both by 0.1 with every seed agreeing: a group of its own
    assert order == [[S("grass-uniform"), S("fft")], [S("lora")]]


def seeds3(*losses, prose=3.0):
    return {s: {"figures": {"test_loss": v, "prose_loss": prose + (v - losses[0]), "cpu_s_per_update": 3.0}}
            for s, v in zip((1, 2, 3), losses)}


def test_auto_order_ranks_only_user_settings_pools_only_3_seed_main_arms_and_keeps_grass_behind_uniform():
    eq = {S("grass"): seeds3(0.600, 0.610, 0.620), S("grass-uniform"): seeds3(0.602, 0.611, 0.623),
          S("lora"): seeds3(0.70, 0.71, 0.72), S("grass-static"): seeds3(0.40, 0.41, 0.42),
          S("fft-noise"): seeds3(0.30, 0.31, 0.32), S("fft"): {1: seeds3(0.5)[1], 2: seeds3(0.9)[1]}}
    ranked = rep.ranked_for_auto(eq)
    assert set(ranked) == {S("grass"), S("grass-uniform"), S("lora"), S("fft")}  # not GRASS*, not the noised starts
    # rule 1's pool: the 3-seed main arms only (GRASS* has 3 seeds but is no main arm; FFT has 2)
    assert set(rep.main_arms(eq)) == {S("grass"), S("grass-uniform"), S("lora")}
    sd, df = rep.pooled(eq, "test_loss")
    assert df == 6 and math.isclose(sd, rep.pooled_sd([[0.600, 0.610, 0.620], [0.602, 0.611, 0.623],
                                                       [0.70, 0.71, 0.72]])[0])
    memory = {S("grass"): 14.0, S("grass-uniform"): 14.0 + 1e-9, S("lora"): 15.0, S("fft"): 100.0}
    order = rep.preference({s: eq[s] for s in (S("grass"), S("grass-uniform"), S("lora"))}, (sd, df), memory, {})
    # GRASS ahead by a hair, unresolved, and predicted a hair leaner: still behind grass-uniform (rule 2)
    assert order == [[S("grass-uniform"), S("grass")], [S("lora")]]
    # a difference with no interval (one seed, no pooled sd yet) is not resolved: it joins the group above
    one = {S("grass-uniform"): {1: seeds3(0.6)[1]}, S("lora"): {1: seeds3(0.9)[1]}}
    assert rep.preference(one, None, memory, {}) == [[S("grass-uniform"), S("lora")]]
    # with the pooled sd the same one-seed gap of 0.3 is resolved
    assert rep.preference(one, (sd, df), memory, {}) == [[S("grass-uniform")], [S("lora")]]


def test_importance_forgetting_and_repair_verdicts_follow_rules_2_3_and_4():
    gu = seeds3(0.610, 0.620, 0.630)
    # GRASS lower in every seed: mgn stays, but only with seeds 1-3 paired
    better = seeds3(0.600, 0.611, 0.620)
    assert rep.importance_verdict({s: better[s] for s in (1, 2)}, gu) == "not yet (seeds 1-3)"
    assert "mgn stays" in rep.importance_verdict(better, gu)
    assert "did not pay" in rep.importance_verdict(seeds3(0.600, 0.625, 0.628), gu)  # mixed: interval across 0
    # rule 3: the first setting's prose loss against the next one's, flagged only when wholly worse
    eq = {S("grass-uniform"): seeds3(0.60, 0.61, 0.62, prose=3.0), S("fft"): seeds3(0.60, 0.61, 0.62, prose=3.5)}
    eq[S("fft")] = {s: {"figures": {**r["figures"], "prose_loss": 3.5 + 0.01 * s}} for s, r in eq[S("fft")].items()}
    assert "forgets more" in " ".join(rep.forgetting_check([[S("fft")], [S("grass-uniform")]], eq))
    assert "not wholly worse" in " ".join(rep.forgetting_check([[S("grass-uniform")], [S("fft")]], eq))
    # rule 4: repair only when the growth's interval lies above 0
    assert rep.repair_verdict((0.05, 0.02, 0.08), 3).startswith("repair detected")
    assert rep.repair_verdict((0.05, -0.02, 0.12), 3).startswith("no repair detected")
    assert rep.repair_verdict((0.05, 0.02, 0.08), 2).startswith("not yet")


def test_the_memory_axis_reads_gamma_on_7b_as_method_auto_does():
    from grass_ft.planner.table import frontier_gamma

    assert [frontier_gamma(g, 32) for g in (1, 2, 4, 8, fp.ALL_BLOCKS)] == [1, 2, 4, 9, 32]
    assert frontier_gamma(1, 16) == 1 and frontier_gamma(29, 8) == 8  # at least one block, at most L


def test_q4_1_step_is_read_from_the_grid_and_the_noise_has_its_size():
    g = torch.Generator().manual_seed(0)
    blocks = 4096
    d = torch.rand(blocks, 1, generator=g, dtype=torch.float64) * 0.1 + 0.01
    lo = torch.randn(blocks, 1, generator=g, dtype=torch.float64)
    q = torch.randint(0, 16, (blocks, fd.Q_BLOCK), generator=g)
    q[:, 0], q[:, 1] = 0, 15  # Q4_1 maps a block's min to 0 and its max to 15
    w = (lo + d * q).float().reshape(256, 512)
    torch.testing.assert_close(fd.q4_1_step(w).float(), d.squeeze(1).float(), rtol=1e-5, atol=1e-7)
    assert fd.q4_1_step(torch.randn(64, 64, generator=g)) is None  # not on a 16-level grid
    assert fd.q4_1_step(torch.ones(64)) is None  # not a matrix (a norm)
    model = torch.nn.Linear(512, 256, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    info = fd.add_q4_1_noise_(model, seed=1)
    assert info["tensors"] == 1 and info["elements"] == w.numel()
    z = ((model.weight.detach().double() - w.double()).reshape(blocks, fd.Q_BLOCK) / (d / math.sqrt(12)))
    # 131,072 standard normal draws: the sample sd is 1 within 5 / sqrt(2n) = 0.0098, the mean 0 within 5 / sqrt(n)
    assert abs(float(z.std()) - 1) < 0.0098 and abs(float(z.mean())) < 5 / math.sqrt(z.numel())


def test_forgetting_set_is_the_committed_one(tmp_path):
    texts = fd.prose_passages()
    assert len(texts) == fd.PROSE_N and all(len(t) >= fd.PROSE_MIN_CHARS for t in texts)
    changed = tmp_path / "prose.jsonl"
    changed.write_bytes(fd.PROSE_FILE.read_bytes().replace(b"the", b"teh", 1))
    with pytest.raises(RuntimeError, match="the forgetting set changed"):
        fd.prose_passages(changed)
    assert hashlib.sha256(fd.PROSE_FILE.read_bytes()).hexdigest() == fd.PROSE_SHA256


def test_report_renders_from_a_ledger_alone(tmp_path):
    recs = grids()
    for arm in fp.MAIN:
        lr = {"fft": 1e-4, "lora": 1e-3}.get(arm, 3e-4)
        recs += [fake(S(arm), s, lr, test=0.8 + 0.01 * s, cpu=CPU[arm]) for s in (1, 2, 3)]
    recs += costs()
    recs += [fake(S("fft", updates=333), s, 1e-4, test=0.85, cpu=1000.0) for s in (1, 2, 3)]
    path = tmp_path / "ledger.jsonl"
    for r in recs:
        fr.append_record(r, path)
    rep.cmd_report(path, tmp_path)
    assert "**method=auto's order, provisional**" in (tmp_path / "frontier.md").read_text()  # LoRA's matched run
    for seed in (1, 2, 3):
        fr.append_record(fake(S("lora", updates=385), seed, 1e-3, test=0.9, cpu=1000.0), path)
    rep.cmd_report(path, tmp_path)
    text = (tmp_path / "frontier.md").read_text()
    assert "**method=auto's order**" in text and "FFT, 333 updates" in text and "GRASS (MGN) γ=4 − grass-uniform" in text
    # the order as the planner reads it: every main arm once, each entry one the planner can place on any model
    from grass_ft.planner import table
    from harness import read_jsonl

    order = rep.auto_order(read_jsonl(path))
    assert sorted(order) == sorted(["fft", "lora r=32", *(f"{a} gamma=4" for a in fp.MAIN if a not in
                                                          ("fft", "lora"))])
    assert all(e == "fft" or e.startswith("lora r=") or table.frontier_layerwise(e, 32) for e in order)
    assert repr(order) in text
    assert (tmp_path / "frontier_memory.png").is_file()


def test_token_sums_match_the_librarys_eval_loss_and_count_the_number_tokens():
    from grass_ft.data import tokenize_example
    from grass_ft.evaluation.scoring import eval_loss
    from tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    examples = [{"instruction": f"{a}+{b}=", "input": "", "output": f"The answer is {a + b}", "answer": str(a + b)}
                for a, b in ((1, 2), (3, 4), (5, 9))]
    rows = fr.token_sums(model, [tokenize_example(tok, ex, 256) for ex in examples], tok.pad_token_id,
                         fr.digit_tokens(tok))
    loss, number_loss = fr.per_token(rows)
    # the same token-weighted mean over the same supervised tokens, batched differently: fp32 summation order only
    assert math.isclose(loss, eval_loss(model, tok, examples, 256, 2), rel_tol=1e-5)
    assert rows[:, 3].tolist() == [1.0, 1.0, 2.0]  # the answers' digits: 3, 7, 14 (the prompt's are not scored)
    assert math.isfinite(number_loss) and rows[:, 1].min() > rows[:, 3].max()


class Killed(Exception):
    """Stands for the queue's process being killed midway through a run."""


@pytest.mark.parametrize("arm", ["grass-uniform", "lora", "fft"])  # sampler state, dropout RNG, every weight
def test_a_killed_run_resumes_from_its_checkpoint_bit_for_bit(arm, tmp_path, monkeypatch):
    from grass_ft.model.load import load_tokenizer
    from tiny import tiny_llama

    tok = load_tokenizer(fp.PROTOCOL["model"])  # the protocol's (a character tokenizer would cut the answers off)
    monkeypatch.setattr(fr, "WORK", tmp_path)
    monkeypatch.setattr(fr, "load", lambda noise: (tiny_llama(len(tok), seed=3), tok, None))
    original_training = fr.training

    def weights(model, tok, sets, full):  # the evaluation replaced by the weights' bytes: equal only if identical
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        return {"test_subset_loss": digest, **({"test_loss": digest} if full else {})}

    monkeypatch.setattr(fr, "eval_sets", lambda n=None: {})
    monkeypatch.setattr(fr, "evaluate", weights)
    monkeypatch.setattr(fr, "CURVE_EVERY", 2)
    monkeypatch.setitem(fp.PROTOCOL, "sample_interval", 2)  # the sampler draws (and MGN probes) between checkpoints
    monkeypatch.setitem(fp.PROTOCOL, "update_interval", 2)
    monkeypatch.setitem(fp.PROTOCOL, "train_samples", 24)  # 7 updates of batch 4 go round them once
    s = S(arm, gamma=1 if arm in fp.LAYERWISE else None, lora_r=4 if arm == "lora" else None, updates=7)
    straight = fr.one_run(s, 1, 1e-3)

    def killed_after(calls: int):
        def build(*args):
            t = original_training(*args)
            step, seen = t.runner.train_step, []

            def train_step(*a, **k):
                seen.append(1)
                if len(seen) > calls:
                    raise Killed
                return step(*a, **k)
            t.runner.train_step = train_step
            return t
        return build

    where = tmp_path / "ckpt"
    monkeypatch.setattr(fr, "training", killed_after(5))
    with pytest.raises(Killed):  # checkpoints at updates 2 and 4; killed before the 6th step
        fr.one_run(s, 1, 1e-3, checkpoints=where, every=2)
    from grass_ft.run.checkpoint import list_checkpoints

    assert len(list_checkpoints(where)) == 1  # the newest only
    monkeypatch.setattr(fr, "training", original_training)
    resumed = fr.one_run(s, 1, 1e-3, checkpoints=where, every=2)
    assert resumed["figures"]["resumed_at"] == [4] and straight["figures"]["resumed_at"] == []
    clocks = {"train_cpu_s", "train_wall_s", "eval_cpu_s", "cpu_s_per_update", "others_cpu_s", "others_load",
              "paused_s", "peak_rss_gib", "resumed_at", "curve"}
    a, b = straight["figures"], resumed["figures"]
    assert {k: v for k, v in a.items() if k not in clocks} == {k: v for k, v in b.items() if k not in clocks}
    assert [(p["update"], p["test_subset_loss"]) for p in a["curve"]] == [
        (p["update"], p["test_subset_loss"]) for p in b["curve"]]
    assert b["train_cpu_s"] > 0 and b["updates"] == 7
    if arm != "fft":
        return
    # a checkpoint written by other code is not resumed: the run starts over (and still gives the same figures)
    monkeypatch.setattr(fr, "training", killed_after(5))
    with pytest.raises(Killed):
        fr.one_run(s, 1, 1e-3, checkpoints=tmp_path / "other", every=2)
    monkeypatch.setattr(fr, "training", original_training)
    monkeypatch.setattr(fr, "code_hash", lambda: "changed since")
    again = fr.one_run(s, 1, 1e-3, checkpoints=tmp_path / "other", every=2)
    assert again["figures"]["resumed_at"] == [] and again["figures"]["test_loss"] == a["test_loss"]
    from grass_ft.run.checkpoint import list_checkpoints
    assert [p.name for p in list_checkpoints(tmp_path / "other")] == ["checkpoint-6"]  # its own, not the stale one
    assert all(callable(getattr(fr, name)) for name in fr.TRAJECTORY)  # the hash reads functions that exist


def test_two_queues_take_different_items_and_one_waits_while_the_rest_wait_on_the_others_run(tmp_path, monkeypatch):
    monkeypatch.setattr(fr, "WORK", tmp_path)
    path = tmp_path / "ledger.jsonl"
    first, second = fr.next_item(path), fr.next_item(path)  # a claim is a lock: the second queue skips the first's
    assert first[0][1:] == (S("fft"), 1, 1e-4) and second[0][1:] == (S("grass-uniform"), 1, 3e-4)
    first[1].close()  # (its queue died: the kernel drops the claim) -> the item is free again
    again = fr.next_item(path)
    assert again[0] == first[0]
    again[1].close()
    # what is left waits for a run in hand: wait while another queue holds it, stop when none does
    monkeypatch.setattr(fr, "queue", lambda runs: [("L", S("fft"), 1, 1e-4), ("M", S("grass"), 1, None)])
    held = fr.next_item(path)
    assert fr.next_item(path) == "wait"
    held[1].close()
    fr.append_record(fake(S("fft"), 1, 1e-4), path)
    second[1].close()
    assert fr.next_item(path) is None


def test_the_cost_benchmark_times_updates_after_its_warmup_and_records_rounds_side_by_side(tmp_path, monkeypatch):
    from grass_ft.model.load import load_tokenizer
    from tiny import tiny_llama

    tok = load_tokenizer(fp.PROTOCOL["model"])
    monkeypatch.setattr(fr, "load", lambda noise: (tiny_llama(len(tok), seed=3), tok, None))
    monkeypatch.setitem(fp.PROTOCOL, "train_samples", 16)
    monkeypatch.setitem(fp.PROTOCOL, "sample_interval", 2)
    res = fr.cmd_cost(S("grass", gamma=1), 1e-4, updates=4, flush_denormal=False, warmup=2)
    assert res["updates"] == 4 and res["steps"] >= 4 and res["cpu_s_per_update"] > 0  # probe steps: in the clock
    assert res["cpu_s_per_update"] * 4 == pytest.approx(res["cpu_s_per_step"] * res["steps"])
    # the rounds: every main setting once, the order turned by one each round, the queues paused meanwhile
    monkeypatch.setattr(fr, "WORK", tmp_path)
    monkeypatch.setattr(fr, "machine_load", lambda seconds=5.0: 0.0)
    order = []

    def child(argv, out):
        assert (tmp_path / "pause").exists()
        arm = argv[argv.index("--arm") + 1]
        assert argv.count("--updates") == 1 and argv[argv.index("--updates") + 1] == str(fp.COST_UPDATES)
        order.append(arm)
        busy = arm == "fft" and order.count("fft") == 1  # FFT's first measurement disturbed: redone at once
        return {"arm": arm, "gamma": S(arm).gamma, "lora_r": S(arm).lora_r,
                "cpu_s_per_update": 9.0 if busy else CPU[arm] / 500, "others_load": 0.5 if busy else 0.0}
    monkeypatch.setattr(fr, "in_child", child)
    path = tmp_path / "ledger.jsonl"
    assert fr.cmd_costs(path, 2, "main") == 0 and not (tmp_path / "pause").exists()
    main = ["grass-uniform"] + [a for a in fp.MAIN if a != "grass-uniform"]  # the reference first in round 1
    assert order == main[:2] + main[1:] + main[1:] + main[:1]
    runs = fp.runs_of(fr.read_jsonl(path))
    assert fp.cost_ratio(S("fft"), runs) == (pytest.approx(1.5), 2)
