"""Quality per CPU-second and per byte: the frontier experiment of docs/RESULTS.md (issue 27), run by a ledger.

Every finished run appends one JSON line to ``docs/results/frontier_ledger.jsonl`` (append-only): the arm, seed,
learning rate, γ or LoRA rank, updates, the full resolved config, the git commit, the protocol's hash and every
figure (held-out losses on GSM-style problems of templates never trained on — all answer tokens and the number
tokens alone —, the validation split's losses, the accuracy task, the forgetting set's loss, the eval curve over
updates and process CPU-seconds). ``run`` skips every run already recorded, so the queue can be stopped anywhere
and continued in another session; ``report`` rebuilds docs/results/frontier.md and its plots from the ledger alone.
The rules that read these figures were written in docs/RESULTS.md before the first record. This script loads,
trains, evaluates and records; the protocol, the settings' keys, the rules and the queue are
``frontier_protocol.py`` (bookkeeping over records, no model), the views ``frontier_report.py``.

Protocol (the same for every arm; :data:`frontier_protocol.PROTOCOL`): SmolLM2-135M-Instruct (weights through 4-bit
Q4_1 quantisation), data ``frontier-mix`` (2,000 problems from the run's seed: a quarter GSM-style problems of the
55 training templates, three quarters the accuracy task), batch 4, max_seq_len 256, **500 optimizer updates with a
linear warm-up over the first 5 % and cosine decay to 0**, AdamW, clipping at 1.0, fp32, one thread per run.
Layer-wise arms at γ = 4 of 30 blocks, a draw every 10 steps, embeddings and head trained, GRASS with its training
probe (the library's defaults, pinned here so a later default change does not change a recorded arm's meaning).

Commands:

    python benchmarks/frontier.py plan       # the queue in order, each item done / to run / waiting, CPU left
    python benchmarks/frontier.py run --worker 1   # run the queue, skipping recorded runs (and --worker 2 beside
                                             # it: each takes the next item the other has not claimed); every run
                                             # checkpoints every 50 updates and a killed one resumes
    python benchmarks/frontier.py costs --rounds 1 --settings main   # the cost benchmark: every setting's CPU-s
                                             # per update side by side with the reference's (pauses the queues)
    touch runs/frontier/pause                # hold the runs in hand between two steps (rm to go on): before
                                             # any other heavy work on the machine
    python benchmarks/frontier.py report     # docs/results/frontier.md + plots, from the ledger alone
                                             # (benchmarks/frontier_report.py: the views and the rules' verdicts)
    python benchmarks/frontier.py one --arm badam --seed 1 --lr 3e-4 --smoke   # one run, printed, not recorded
    python benchmarks/frontier.py tasks      # base-model accuracy of the accuracy-task candidates
    python benchmarks/frontier.py cost --arm fft --lr 3e-5   # CPU-s per update of its first 40 updates (no eval)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import frontier_data as fdata  # noqa: E402
from frontier_protocol import (  # noqa: E402
    ALL_BLOCKS, ARMS, COST_LR, COST_UPDATES, COST_WARMUP, CURVE_EVERY, CURVE_SUBSET, EVAL_SETS, LEDGER, MAIN,
    MAX_NEW_TOKENS, NOISY, PROTOCOL, QUIET_LOAD, REFERENCE, THREADS, UPDATES, WARMUP_SHARE, Setting,
    frontier_settings, plan_lines, protocol_id, queue, run_key, runnable, runs_of)
from harness import DOCS, ROOT, append_record, claim_path, git_commit, read_jsonl, try_lock  # noqa: E402

WORK = ROOT / "runs" / "frontier"
CKPT_EVERY = 50  # updates between a run's in-flight checkpoints: a killed run resumes from its newest
MAX_WORKERS = 2  # queues side by side, one per core (docs/RESULTS.md: what sharing the machine costs a run)
SMOKE_N = 4


# ------------------------------------------------------------------------------------------------ one run


def arm_config(s: Setting, seed: int, lr: float):
    from grass_ft.config import build_config
    from grass_ft.methods import method_names

    method, extra = ARMS[s.arm]
    keys = {**PROTOCOL, **extra, "method": method, "seed": seed, "lr": lr, "max_steps": s.updates,
            "warmup_steps": round(WARMUP_SHARE * s.updates), "output_dir": str(WORK / "unused")}
    keys.update({k: v for k, v in (("gamma", s.gamma), ("lora_r", s.lora_r)) if v is not None})
    return build_config(overrides={k: v for k, v in keys.items() if v is not None}, known_methods=method_names())


def eval_sets(n: int | None = None) -> dict[str, list[dict]]:
    """The held-out sets (each cut to ``n`` problems for a smoke run)."""
    from grass_ft.data import _rg_examples

    fdata.register()
    out = {name: fdata.split_examples(part, n or size, seed) for name, (part, size, seed) in EVAL_SETS.items()
           if name != "acc"}
    task, size, seed = EVAL_SETS["acc"]
    gen, options = fdata.TASK_CANDIDATES[task]
    out["acc"] = _rg_examples(gen, n or size, seed, **options)
    out["prose"] = fdata.prose_passages()[:n]
    return out


def digit_tokens(tok):
    """A boolean over the vocabulary: the tokens whose text holds a digit (the number tokens of an answer)."""
    import torch

    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    return torch.tensor([any(c.isdigit() for c in (p or "")) for p in pieces])


def token_sums(model, features: list[dict], pad_id: int, digits):
    """Per example: summed nats and count of its supervised tokens, and the same over its number tokens alone
    (a float64 tensor of shape [examples, 4]), so any subset's token-weighted loss is a sum away."""
    import torch
    import torch.nn.functional as F

    from grass_ft.data import IGNORE_INDEX, collate

    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))  # similar lengths pad little
    sums = torch.zeros(len(features), 4, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), 16):
            rows = order[start:start + 16]
            batch = collate([features[i] for i in rows], pad_id)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            target = batch["labels"][:, 1:]
            nats = F.cross_entropy(out.float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
            scored = target != IGNORE_INDEX
            number = scored & digits[target.clamp_min(0)]
            sums[rows] = torch.stack([(nats * scored).sum(1), scored.sum(1), (nats * number).sum(1), number.sum(1)],
                                     dim=1).double()
    model.train(was_training)
    return sums


def per_token(sums) -> tuple[float, float]:
    """(loss, number-token loss) in nats per token from :func:`token_sums` rows."""
    loss, n, num_loss, num_n = sums.sum(dim=0).tolist()
    return loss / n, num_loss / num_n if num_n else float("nan")


def evaluate(model, tok, sets: dict[str, list[dict]], full: bool) -> dict[str, Any]:
    """The curve's figure (``full`` False: the first 64 test problems) or every held-out figure."""
    from grass_ft.data import tokenize_example
    from grass_ft.evaluate import evaluate_examples

    maxlen, pad = PROTOCOL["max_seq_len"], tok.pad_token_id
    digits = digit_tokens(tok)

    def sums(name: str, k: int | None = None):
        return token_sums(model, [tokenize_example(tok, ex, maxlen) for ex in sets[name][:k]], pad, digits)

    if not full:
        return {"test_subset_loss": per_token(sums("test", CURVE_SUBSET))[0]}
    out: dict[str, Any] = {}
    for name in ("test", "validation", "seen", "acc"):
        rows = sums(name)
        out[f"{name}_loss"], out[f"{name}_number_loss"] = per_token(rows)
        if name == "test":
            out["test_subset_loss"] = per_token(rows[:CURVE_SUBSET])[0]
    prose = []
    for text in sets["prose"]:
        ids = tok(text, add_special_tokens=False)["input_ids"][:maxlen]
        prose.append({"input_ids": ids, "labels": list(ids)})
    out["prose_loss"] = per_token(token_sums(model, prose, pad, digits))[0]
    acc = evaluate_examples(model, tok, sets["acc"], "gsm8k", max_new_tokens=MAX_NEW_TOKENS, batch_size=16,
                            progress=False)
    out["acc_accuracy"], out["acc_n"] = acc["accuracy"], acc["n"]
    out["n"] = {name: len(rows) for name, rows in sets.items()}
    return out


def load(noise: bool):
    """The model as loaded (plus Q4_1-sized noise for the `-noise` arms) and its tokenizer."""
    from grass_ft.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(PROTOCOL["model"], PROTOCOL["dtype"])
    added = fdata.add_q4_1_noise_(model) if noise else None
    return model, tok, added


def busy_cpu_s() -> float | None:
    """CPU-seconds the whole machine has been busy since boot (Linux /proc/stat: user, nice, system, irq, softirq
    and steal over every CPU); None where there is no /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_while_paused(poll_s: float = 5.0) -> float:
    """Between two training steps: while ``runs/frontier/pause`` exists, wait (outside every clock); the seconds
    waited. A session that works on the machine pauses the run this way (docs/RESULTS.md, "To continue")."""
    pause = WORK / "pause"
    if not pause.exists():
        return 0.0
    t0 = time.perf_counter()
    print(f"[pause] {pause} exists: waiting between two steps until it is removed", flush=True)
    while pause.exists():
        time.sleep(poll_s)
    return time.perf_counter() - t0


@dataclass
class Training:
    """What a run trains with: its config, tokenizer, the noise added to the weights, the prepared method, the rate
    schedule, the step runner, the batch stream, the loss and the step budget."""

    cfg: Any
    tok: Any
    noise: Any
    prepared: Any
    schedule: Any
    runner: Any
    stream: Any
    forward: Any
    n_steps: int
    n_updates: int


def training(s: Setting, seed: int, lr: float) -> Training:
    """The protocol's model, data, method, schedule and step runner for one run (seeded: the same for every
    process that asks)."""
    import torch

    from grass_ft import data as data_mod
    from grass_ft.loss import loss_forward
    from grass_ft.methods import prepare, step_budget
    from grass_ft.step import StepRunner, lr_factor

    cfg = arm_config(s, seed, lr)
    torch.manual_seed(cfg.seed)
    model, tok, noise = load(s.arm in NOISY)
    examples = data_mod.generate_examples(cfg.data, cfg.train_samples, cfg.seed)
    stream = data_mod.BatchStream([data_mod.tokenize_example(tok, ex, cfg.max_seq_len) for ex in examples],
                                  cfg.batch_size, tok.pad_token_id, seed=cfg.seed)
    prepared = prepare(model, cfg)
    n_steps, n_updates = step_budget(cfg, prepared.sampler)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        prepared.optimizer, lambda k: lr_factor(k, cfg.warmup_steps, n_updates, cfg.lr_schedule))
    runner = StepRunner(prepared, schedule, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                        max_bad_steps=cfg.max_bad_steps)
    return Training(cfg, tok, noise, prepared, schedule, runner, stream, loss_forward(cfg.supervised_only_loss),
                    n_steps, n_updates)


def code_hash() -> str:
    """sha256 over what a run's trajectory depends on: the library's sources, frontier_data.py and the source of
    this script's functions that set up, train and checkpoint a run (the protocol's constants are in the run's key).
    A checkpoint resumes only under the same hash; a change elsewhere in this script (the queue, the report, the
    cost benchmark) leaves runs in flight resumable."""
    import ast

    h = hashlib.sha256()
    here = Path(__file__).resolve()
    for f in sorted((ROOT / "src" / "grass_ft").rglob("*.py")) + [here.parent / "frontier_data.py"]:
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    text = here.read_text()
    for node in ast.parse(text).body:  # as written in the file (a test's stand-in does not change the hash)
        if isinstance(node, ast.FunctionDef) and node.name in TRAJECTORY:
            h.update(ast.get_source_segment(text, node).encode())
    return h.hexdigest()


TRAJECTORY = ("arm_config", "load", "training", "one_run", "save_inflight", "resume_inflight", "wait_while_paused")


def inflight(key: str) -> Path:
    """Where a run's in-flight checkpoint lives until its record is in the ledger."""
    return WORK / "inflight" / hashlib.sha256(key.encode()).hexdigest()[:16]


def save_inflight(where: Path, step: int, t: Training, run: dict[str, Any], code: str) -> None:
    """checkpoint-<step> under ``where`` (the newest only): weights, optimizer, scheduler, sampler, random state,
    data position and the run's clocks and curve so far, so a killed run goes on bit for bit (the library's resume)."""
    from grass_ft.run.checkpoint import rng_state, save_checkpoint

    extra = {"runner": t.runner.state_dict(), "rng": rng_state(), "run": json.dumps(run)}
    save_checkpoint(where, step, t.prepared.model, t.prepared.optimizer, t.schedule, extra,
                    {"data": t.stream.state_dict(), "code": code}, save_total_limit=1)


def resume_inflight(where: Path, t: Training, code: str) -> tuple[int, dict[str, Any]] | None:
    """The newest complete checkpoint under ``where`` loaded into ``t``: (the next step, the run so far); None
    when there is none or it was written by other code (the run then starts over)."""
    from grass_ft.run.checkpoint import list_checkpoints, load_checkpoint, set_rng_state

    found = list_checkpoints(where)
    if found and json.loads((found[-1] / "trainer_state.json").read_text()).get("code") != code:
        from grass_ft.base.atomic import remove_dir

        print(f"[restart] {found[-1]} was written by other code: the run starts over", flush=True)
        for stale in found:  # else a stale later step would outlive this run's own checkpoints
            remove_dir(stale)
        return None
    if not found:
        return None
    trainer_state, extra = load_checkpoint(found[-1], t.prepared.model, t.prepared.optimizer, t.schedule)
    t.runner.load_state_dict(extra["runner"])
    set_rng_state(extra["rng"])
    t.stream.load_state_dict(trainer_state["data"])
    return trainer_state["step"], json.loads(extra["run"])


def one_run(s: Setting, seed: int, lr: float, smoke: bool = False, checkpoints: Path | None = None,
            every: int = CKPT_EVERY) -> dict[str, Any]:
    """Train one setting and evaluate it; returns the ledger record's ``config`` and ``figures``. With
    ``checkpoints`` (a directory), a checkpoint every ``every`` updates, outside every clock, and a run killed
    midway resumes from its newest one (``resumed_at``: the updates it resumed at)."""
    import resource

    import torch

    from grass_ft.step import optimizer_state_bytes

    torch.set_num_threads(THREADS)
    fdata.register()
    sets = eval_sets(SMOKE_N if smoke else None)  # no torch random numbers: the seeded training is as before
    t = training(s, seed, lr)
    tok, prepared, runner, stream, forward = t.tok, t.prepared, t.runner, t.stream, t.forward
    n_steps, n_updates = (1, 1) if smoke else (t.n_steps, t.n_updates)
    run: dict[str, Any] = {  # others: the rest of the machine's CPU-s during this run's steps
        "clock": {"cpu": 0.0, "wall": 0.0, "eval_cpu": 0.0, "paused": 0.0,
                  "others": 0.0 if busy_cpu_s() is not None else None},
        "curve": [], "losses": [], "drawn": [], "updates": 0, "resumed_at": []}
    code, first = (code_hash(), 0) if checkpoints is not None else ("", 0)
    if checkpoints is not None and (back := resume_inflight(checkpoints, t, code)) is not None:
        first, run = back
        run["resumed_at"].append(run["updates"])
        print(f"[resume] {checkpoints}: from update {run['updates']} (step {first})", flush=True)
    clock, curve, losses, drawn = run["clock"], run["curve"], run["losses"], set(run["drawn"])
    for step in range(first, n_steps):
        clock["paused"] += wait_while_paused()
        b0, c0, w0 = busy_cpu_s(), time.process_time(), time.perf_counter()
        res = runner.train_step(step, [stream.next_batch()], forward=forward)
        own = time.process_time() - c0
        clock["cpu"] += own
        clock["wall"] += time.perf_counter() - w0
        if clock["others"] is not None:
            clock["others"] += busy_cpu_s() - b0 - own
        if res.probe:
            continue
        run["updates"] = updates = run["updates"] + 1
        losses.append(res.loss)
        drawn |= set(res.active)
        if updates % CURVE_EVERY == 0 and updates < n_updates:
            e0 = time.process_time()
            point = evaluate(prepared.model, tok, sets, full=False)
            clock["eval_cpu"] += time.process_time() - e0
            curve.append({"update": updates, "train_cpu_s": clock["cpu"], "train_wall_s": clock["wall"], **point})
        if checkpoints is not None and updates % every == 0 and updates < n_updates:
            run["drawn"] = sorted(drawn)
            save_inflight(checkpoints, step + 1, t, run, code)
    updates = run["updates"]
    state = optimizer_state_bytes(prepared.optimizer)
    e0 = time.process_time()
    final = evaluate(prepared.model, tok, sets, full=True)
    clock["eval_cpu"] += time.process_time() - e0
    curve.append({"update": updates, "train_cpu_s": clock["cpu"], "train_wall_s": clock["wall"],
                  "test_subset_loss": final["test_subset_loss"]})
    return {"config": t.cfg.to_dict(), "figures": {
        **final, "curve": curve, "updates": updates, "train_cpu_s": clock["cpu"], "train_wall_s": clock["wall"],
        "eval_cpu_s": clock["eval_cpu"], "cpu_s_per_update": clock["cpu"] / max(1, updates),
        "others_cpu_s": clock["others"], "paused_s": clock["paused"],
        "others_load": None if clock["others"] is None else max(0.0, clock["others"]) / max(clock["wall"], 1e-9),
        "skipped_steps": runner.skipped_steps, "distinct_blocks": len(drawn) if prepared.sampler else None,
        "final_train_loss": statistics.fmean(losses[-20:]), "noise": t.noise, "resumed_at": run["resumed_at"],
        "optimizer_state_mib": {k: v / 2**20 for k, v in state.items()},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}


def base_figures(noise: bool) -> dict[str, Any]:
    """The model as loaded (with or without the noise) on the same held-out sets: update 0 of every curve."""
    import torch

    torch.set_num_threads(THREADS)
    model, tok, added = load(noise)
    c0 = time.process_time()
    return {**evaluate(model, tok, eval_sets(), full=True), "noise": added, "eval_cpu_s": time.process_time() - c0}


# ------------------------------------------------------------------------------------------------ the queue


def record_common() -> dict[str, Any]:
    import torch

    sha, dirty = git_commit()
    return {"protocol_id": protocol_id(), "protocol": PROTOCOL, "eval_sets": EVAL_SETS,
            "template_split": fdata.template_split(), "acc_task": [fdata.ACC_TASK_NAME, fdata.ACC_TASK],
            "prose_sha256": fdata.PROSE_SHA256, "git_commit": sha, "git_dirty_src": dirty,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": THREADS,
                     "torch": torch.__version__, "python": platform.python_version(),
                     "note": "two queues on two cores: read CPU-seconds, not wall time; costs: the cost benchmark"}}


def in_child(argv: list[str], out: Path) -> dict | None:
    """Runs this script's ``argv`` in a fresh process (each run's CPU time and peak memory are its own) and
    returns what it wrote to ``out``; None when it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--json-out", str(out)], env=env)
    return json.loads(out.read_text()) if done.returncode == 0 and out.is_file() else None


def shape_args(s: Setting) -> list[str]:
    """The arm, γ and rank of ``s`` as command-line arguments (``one`` and ``cost`` take them alike)."""
    return ["--arm", s.arm] + (["--gamma", str(s.gamma)] if s.gamma else []) + (
        ["--rank", str(s.lora_r)] if s.lora_r else [])


def setting_args(s: Setting) -> list[str]:
    return shape_args(s) + ["--updates", str(s.updates)]


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def others_running() -> bool:
    """Whether another queue holds a claim on an item (its run may unblock items that wait for it)."""
    for path in (WORK / "claims").glob("*.lock"):
        held = try_lock(path)
        if held is None:
            return True
        held.close()
    return False


def next_item(ledger: Path):
    """The first runnable, unrecorded, not failed item no other queue has claimed, with its claim held; "wait" when
    the rest wait for a run another queue has in hand; None when the queue has nothing left to run."""
    runs = runs_of(read_jsonl(ledger))
    failed_file = WORK / "failed.txt"
    failed = set(failed_file.read_text().splitlines()) if failed_file.exists() else set()
    for item in queue(runs):
        if not runnable(item):
            continue
        key = run_key(*item[1:])
        if key in runs or key in failed or (held := try_lock(claim_path(WORK, key))) is None:
            continue
        if key in runs_of(read_jsonl(ledger)):  # another queue recorded it between the two reads
            held.close()
            continue
        return item, held
    if others_running():
        return "wait"
    waiting = sum(1 for t in queue(runs) if not runnable(t))
    print(f"[idle] nothing runnable; {waiting} item(s) wait for runs they depend on", flush=True)
    return None


def cmd_run(ledger: Path, max_runs: int | None, worker: int = 1) -> int:
    """Run the queue: each run in a child process, checkpointed every :data:`CKPT_EVERY` updates (a killed run
    resumes), one record per finished run. Up to :data:`MAX_WORKERS` queues (``--worker 1``, ``--worker 2``) run
    side by side, each on its own core, never the same item (a claim per item)."""
    lock = try_lock(WORK / f"queue-{worker}.lock")
    if lock is None:
        print(f"queue {worker} is already running ({WORK / f'queue-{worker}.lock'}); not starting it twice", flush=True)
        return 1
    for noise in (False, True):
        key = f"base|noise={noise}|protocol={protocol_id()}"
        if not any(r.get("key") == key for r in read_jsonl(ledger)) and (held := try_lock(claim_path(WORK, key))):
            print(f"[base] the model as loaded{' + Q4_1-sized noise' if noise else ''}", flush=True)
            figures = in_child(["base"] + (["--noise"] if noise else []), WORK / f"base-{worker}.json")
            if figures is not None:
                append_record({"record": "base", "key": key, "noise": noise, **record_common(),
                               "finished_utc": stamp(), "figures": figures}, ledger)
            held.close()
    done = 0
    while max_runs is None or done < max_runs:
        if (WORK / "stop").exists():  # drain: finish the run in hand, then exit (rm the file to go on)
            print(f"[stop] {WORK / 'stop'} exists: not starting another run", flush=True)
            return 0
        got = next_item(ledger)
        if got is None:
            return 0
        if got == "wait":
            time.sleep(60)
            continue
        (phase, s, seed, lr), held = got
        key = run_key(s, seed, lr)
        print(f"[run ] {phase}: {key}", flush=True)
        started, t0 = stamp(), time.perf_counter()
        rec = in_child(["one", *setting_args(s), "--seed", str(seed), "--lr", repr(lr), "--checkpoints",
                        str(inflight(key))], WORK / f"one-{worker}.json")
        if rec is None:
            with open(WORK / "failed.txt", "a") as f:  # not retried by this queue; delete the line to retry
                f.write(key + "\n")
            print(f"[FAIL] {key}", flush=True)
        else:
            append_record({"record": "run", "key": key, "arm": s.arm, "gamma": s.gamma, "lora_r": s.lora_r,
                           "updates": s.updates, "seed": seed, "lr": lr, "phase": phase, "noise": s.arm in NOISY,
                           **record_common(), "started_utc": started, "finished_utc": stamp(), **rec}, ledger)
            if inflight(key).exists():
                from grass_ft.base.atomic import remove_dir

                remove_dir(inflight(key))
            f = rec["figures"]
            print(f"[done] {key}: test loss {f['test_loss']:.4f}, validation {f['validation_loss']:.4f}, accuracy "
                  f"{100 * f['acc_accuracy']:.1f} %, {f['train_cpu_s']:.0f} CPU-s training, "
                  f"{time.perf_counter() - t0:.0f} s wall, others' load "
                  f"{'–' if f['others_load'] is None else format(f['others_load'], '.2f')} CPUs", flush=True)
        held.close()
        done += 1
    return 0


# ------------------------------------------------------------------------------------------------ cost check


def cmd_cost(s: Setting, lr: float, updates: int, flush_denormal: bool, warmup: int = 0) -> dict[str, Any]:
    """After ``warmup`` updates, the next ``updates`` updates of the protocol's seed-1 run of ``s`` at ``lr``: CPU-
    seconds per update (probe steps in them, as in a run), the first and last 10 steps, the rest of the machine's
    load meanwhile, and the optimizer state's denormal values; no evaluation. Run it twice at one rate to see the
    run-to-run spread, at two rates to see whether the rate moves the cost (docs/RESULTS.md)."""
    import torch

    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(flush_denormal)
    fdata.register()
    t = training(s, 1, lr)
    step, done, cpu, others, wall = 0, 0, [], 0.0, 0.0
    while done < warmup + updates:
        b0, c0, w0 = busy_cpu_s(), time.process_time(), time.perf_counter()
        res = t.runner.train_step(step, [t.stream.next_batch()], forward=t.forward)
        own = time.process_time() - c0
        step += 1
        if done >= warmup:  # the clock runs from the first update after the warm-up, probe steps included
            cpu.append(own)
            wall += time.perf_counter() - w0
            others += (busy_cpu_s() or 0.0) - (b0 or 0.0) - own
        done += not res.probe
    tiny = torch.finfo(torch.float32).tiny
    denormal = sum(int(((v.abs() < tiny) & (v != 0)).sum()) for st in t.prepared.optimizer.state.values()
                   for v in (st.values() if isinstance(st, dict) else ()) if torch.is_tensor(v) and v.is_floating_point())
    return {"arm": s.arm, "gamma": s.gamma, "lora_r": s.lora_r, "lr": lr, "warmup": warmup, "updates": updates,
            "steps": len(cpu), "flush_denormal": flush_denormal, "cpu_s_per_update": sum(cpu) / updates,
            "cpu_s_per_step": statistics.fmean(cpu), "first10": statistics.fmean(cpu[:10]),
            "last10": statistics.fmean(cpu[-10:]), "others_load": max(0.0, others) / max(wall, 1e-9),
            "denormal_state_values": denormal}




def machine_load(seconds: float = 5.0) -> float:
    """The machine's busy CPUs over the next ``seconds`` (this process idle meanwhile)."""
    b0 = busy_cpu_s()
    time.sleep(seconds)
    return ((busy_cpu_s() or 0.0) - (b0 or 0.0)) / seconds


def cmd_costs(ledger: Path, rounds: int, which: str) -> int:
    """The cost benchmark (docs/RESULTS.md, third amendment): ``rounds`` rounds, each measuring the reference and
    every setting of ``which`` once, side by side in time (one fresh process after another, the order turned by
    one place each round), :data:`COST_WARMUP` untimed then :data:`COST_UPDATES` timed updates, on the quiet
    machine (the queues are paused meanwhile; a measurement waits for the rest of the machine to fall quiet). One
    ledger record per measurement; :func:`cost_ratio` reads them."""
    settings = [REFERENCE] + ([Setting(a) for a in MAIN if a != REFERENCE.arm] if which == "main"
                              else frontier_settings())
    pause = WORK / "pause"
    mine = not pause.exists()
    pause.parent.mkdir(parents=True, exist_ok=True)
    pause.touch()
    try:
        for _ in range(rounds):
            rnd = 1 + max((r["round"] for r in read_jsonl(ledger) if r.get("record") == "cost"), default=0)
            k = (rnd - 1) % len(settings)
            for s in settings[k:] + settings[:k]:
                for _attempt in range(3):  # a measurement the rest of the machine disturbed is recorded, then redone
                    while (load := machine_load()) > QUIET_LOAD:
                        print(f"[cost] the machine is busy ({load:.2f} CPUs): waiting for it to fall quiet",
                              flush=True)
                        time.sleep(25)
                    print(f"[cost] round {rnd}: {s.name}", flush=True)
                    rec = in_child(["cost", *shape_args(s), "--lr", repr(COST_LR),
                                    "--warmup", str(COST_WARMUP), "--updates", str(COST_UPDATES)],
                                   WORK / "cost.json")
                    if rec is None:
                        print(f"[FAIL] cost of {s.name}", flush=True)
                        return 1
                    append_record({"record": "cost", "key": f"cost|{run_key(s, 1, COST_LR)}|round={rnd}",
                                   "round": rnd, **record_common(), "finished_utc": stamp(), **rec}, ledger)
                    print(f"[cost] {s.name}: {rec['cpu_s_per_update']:.3f} CPU-s/update "
                          f"(others' load {rec['others_load']:.2f})", flush=True)
                    if rec["others_load"] <= QUIET_LOAD:
                        break
    finally:
        if mine:
            pause.unlink(missing_ok=True)
    return 0


# ------------------------------------------------------------------------------------------------ tasks, prose


def cmd_tasks(n: int) -> None:
    """Base-model accuracy of each accuracy-task candidate (greedy, 16 new tokens, the gsm8k answer rule)."""
    import torch

    from grass_ft.data import _rg_examples
    from grass_ft.evaluate import evaluate_examples

    torch.set_num_threads(THREADS)
    model, tok, _ = load(False)
    for name, (gen, options) in fdata.TASK_CANDIDATES.items():
        acc = evaluate_examples(model, tok, _rg_examples(gen, n, EVAL_SETS["acc"][2], **options), "gsm8k",
                                max_new_tokens=MAX_NEW_TOKENS, batch_size=16, progress=False)
        print(f"| {name} | {100 * acc['accuracy']:.1f} % | {acc['n']} |", flush=True)


def cmd_prose(write: bool) -> None:
    rows = fdata.extract_prose()
    blob = fdata.prose_bytes(rows)
    if write:
        fdata.PROSE_FILE.parent.mkdir(parents=True, exist_ok=True)
        fdata.PROSE_FILE.write_bytes(blob)
    print(f"{len(rows)} passages, {sum(len(r['text']) for r in rows)} characters, sha256 "
          f"{hashlib.sha256(blob).hexdigest()}" + ("" if write else " (not written: --write)"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run the queue, skipping runs already in the ledger (checkpointed, resumable)")
    p_run.add_argument("--max-runs", type=int, default=None)
    p_run.add_argument("--worker", type=int, default=1, choices=range(1, MAX_WORKERS + 1),
                       help=f"which of the {MAX_WORKERS} queues this is (each takes the next unclaimed item)")
    sub.add_parser("report", help="docs/results/frontier.md and plots from the ledger alone")
    sub.add_parser("plan", help="the queue, what is done and the CPU left")
    p_one = sub.add_parser("one", help="one run; prints its figures (recorded only by `run`)")
    p_one.add_argument("--arm", choices=list(ARMS), required=True)
    p_one.add_argument("--seed", type=int, required=True)
    p_one.add_argument("--lr", type=float, required=True)
    p_one.add_argument("--gamma", type=int, default=None)
    p_one.add_argument("--rank", type=int, default=None)
    p_one.add_argument("--updates", type=int, default=UPDATES)
    p_one.add_argument("--smoke", action="store_true", help="1 update, 4 problems per held-out set")
    p_one.add_argument("--checkpoints", type=Path, default=None,
                       help=f"a checkpoint every {CKPT_EVERY} updates here; resume from the newest found")
    p_base = sub.add_parser("base", help="the model as loaded on the held-out sets")
    p_base.add_argument("--noise", action="store_true")
    p_cost = sub.add_parser("cost", help="CPU-s per update of a run's first updates (no evaluation, not recorded)")
    p_cost.add_argument("--arm", choices=list(ARMS), required=True)
    p_cost.add_argument("--gamma", type=int, default=None)
    p_cost.add_argument("--rank", type=int, default=None)
    p_cost.add_argument("--lr", type=float, required=True)
    p_cost.add_argument("--updates", type=int, default=40, help="updates timed")
    p_cost.add_argument("--warmup", type=int, default=0, help="updates before the clock starts")
    p_cost.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True)")
    for p in (p_one, p_base, p_cost):
        p.add_argument("--json-out", type=Path, default=None)
    p_costs = sub.add_parser("costs", help="the cost benchmark: settings side by side, one record per measurement")
    p_costs.add_argument("--rounds", type=int, default=1)
    p_costs.add_argument("--settings", choices=("main", "frontier"), default="main")
    p_tasks = sub.add_parser("tasks", help="base-model accuracy of the accuracy-task candidates")
    p_tasks.add_argument("-n", type=int, default=100)
    p_prose = sub.add_parser("prose", help="extract the forgetting set (and its hash); --write replaces the file")
    p_prose.add_argument("--write", action="store_true")
    for p in (p_run, p_costs, sub.choices["plan"], sub.choices["report"]):
        p.add_argument("--ledger", type=Path, default=LEDGER)
    sub.choices["report"].add_argument("--docs", type=Path, default=DOCS)
    args = ap.parse_args()
    if args.cmd == "one" and (args.updates < 1 or args.lr <= 0 or (args.gamma is not None and not
                                                                     1 <= args.gamma <= ALL_BLOCKS)):
        print(f"frontier.py one: --updates must be >= 1, --lr > 0 and --gamma in 1..{ALL_BLOCKS}", file=sys.stderr)
        return 2
    if args.cmd == "run":
        return cmd_run(args.ledger, args.max_runs, args.worker)
    if args.cmd == "report":
        from frontier_report import cmd_report

        cmd_report(args.ledger, args.docs)
    elif args.cmd == "plan":
        print("\n".join(plan_lines(runs_of(read_jsonl(args.ledger)))))
    elif args.cmd == "costs":
        return cmd_costs(args.ledger, args.rounds, args.settings)
    elif args.cmd == "tasks":
        cmd_tasks(args.n)
    elif args.cmd == "prose":
        cmd_prose(args.write)
    else:
        if args.cmd == "cost":
            res = cmd_cost(Setting(args.arm, args.gamma, args.rank), args.lr, max(10, args.updates),
                           args.flush_denormal, args.warmup)
        elif args.cmd == "one":
            s = Setting(args.arm, args.gamma, args.rank, args.updates)
            res = one_run(s, args.seed, args.lr, smoke=args.smoke, checkpoints=args.checkpoints)
        else:
            res = base_figures(args.noise)
        text = json.dumps(res)
        if args.json_out:
            args.json_out.write_text(text)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
