"""GrassCallback with GrassTrainer in 2 processes (torchrun, gloo, CPU): the same training as one process with the
same global batch, identical traces on both ranks, and only the active blocks' gradients communicated -- against the
plain Trainer's DDP with find_unused_parameters=True, measured with a DDP communication hook (tests/hf_dist_worker.py).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grass_ft.config import TrainConfig
from grass_ft.frontends.hf import _refuse_untested
from grass_ft.method.methods import prepare
from grass_ft.model import block_layout
from hf_dist_worker import KEYS
from test_distributed import GRAD_NORM_RTOL
from tiny import char_tokenizer, tiny_llama

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).parent / "hf_dist_worker.py")


def launch(out: Path, mode: str, nproc: int, **kw) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRASS_FT_TRACE_ALL_RANKS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else \
        [sys.executable]
    args = [f"{k}={v}" for k, v in kw.items()]
    r = subprocess.run([*launcher, WORKER, str(out), mode, *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hfdist")
    launch(tmp / "one", "grass", 1, batch=4, optim="sgd")  # plain SGD: see the comparison below
    launch(tmp / "two", "grass", 2, batch=2, optim="sgd")
    launch(tmp / "two_adamw", "grass", 2, batch=2, save_steps=3)  # AdamW: checkpoint-3 for the exact-resume test
    launch(tmp / "ddp", "ddp", 2, batch=2)
    # gradient accumulation: 2 micro-batches of 1 example per rank, against one process with 2 micro-batches of 2
    # (the probe observes each micro-batch, so the reference must split the global batch the same way)
    launch(tmp / "one_accum", "grass", 1, batch=2, accum=2, optim="sgd")
    launch(tmp / "two_accum", "grass", 2, batch=1, accum=2, optim="sgd")
    return tmp


def jsonl(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("one,two", [("one", "two"), ("one_accum", "two_accum")], ids=["accum1", "accum2"])
def test_two_processes_equal_one_with_same_global_batch(runs, one, two):
    # Not bit-exact: each gradient element differs by the fp32 reordering of the two halves' sums, first order
    # <= GRAD_NORM_RTOL (1e-4) of its terms (tests/test_distributed.py derives it). Both runs use plain SGD
    # (optim="sgd"): AdamW would turn a cancelling element's rounding noise into an update of ~lr whatever its
    # sign, leaving the weights after several steps without a bound (issue 28), while SGD moves each weight by
    # lr x its gradient (clipped to norm 1, so |g| <= 1): after 4 updates the weights differ by at most
    # sum_t lr (1e-4 |g| + 1e-6) (1 + lr ||H||)^t ~ 4 x 1e-2 x 1e-4 ~ 4e-6 -- inside assert_close's float32 atol
    # (1e-5) -- and each logged norm by the same 1e-4 relative plus ||H|| x 4e-6. A missed all-reduce or a rank
    # on the wrong shard changes the weights by ~lr |g| ~ 1e-3 and the norm by O(1).
    w1, w2 = torch.load(runs / one / "weights.pt"), torch.load(runs / two / "weights.pt")
    w0 = {n: p.detach() for n, p in tiny_llama(len(char_tokenizer()), layers=4).named_parameters()}
    for n, w in w1.items():
        torch.testing.assert_close(w2[n], w, msg=n)
    assert sum(not torch.equal(w, w0[n]) for n, w in w1.items()) > 0  # the comparison is of trained weights
    h1, h2 = (json.loads((runs / r / "log_history.json").read_text()) for r in (one, two))
    norms = [(a["step"], a["grad_norm"], b["grad_norm"]) for a, b in zip(h1, h2) if a.get("grad_norm")]
    assert [s for s, _, _ in norms] == [3, 4, 5, 6]  # the Trainer logs step k+1 after update k; 2 probe steps
    for step, g1, g2 in norms:
        assert g2 == pytest.approx(g1, rel=GRAD_NORM_RTOL), step
    draws = [[e["active"] for e in jsonl(runs / r / "layers.jsonl") if e["event"] == "draw"] for r in (one, two)]
    assert draws[0] == draws[1]


def test_identical_traces_on_both_ranks_and_as_one_process(runs):
    rank0, rank1 = jsonl(runs / "two" / "layers.jsonl"), jsonl(runs / "two" / "layers.rank1.jsonl")
    assert rank0 == rank1
    draws = [tuple(e["active"]) for e in rank0 if e["event"] == "draw"]
    assert len(draws) == 2 and len(set(draws)) == 2
    assert [tuple(e["active"]) for e in jsonl(runs / "one" / "layers.jsonl") if e["event"] == "draw"] == draws


def test_only_active_blocks_are_communicated_unlike_ddp(runs):
    model = tiny_llama(len(char_tokenizer()), layers=4)
    layout = block_layout(model)
    total = sum(p.numel() for p in model.parameters())
    params = dict(model.named_parameters())
    always = prepare(model, TrainConfig(**KEYS)).always  # the default: embeddings, final norm and head
    always_numel = sum(params[n].numel() for n in always)
    assert always_numel > 0
    active = {e["step"]: e["active"] for e in jsonl(runs / "two" / "layers.jsonl") if e["event"] == "draw"}
    ours = {int(k): v for k, v in json.loads((runs / "two" / "bytes.rank0.json").read_text()).items()}
    assert ours == {int(k): v for k, v in json.loads((runs / "two" / "bytes.rank1.json").read_text()).items()}
    current = None
    for step in sorted(ours):
        if step < 2:  # the probe: every block parameter's gradient, averaged once per micro-batch
            assert ours[step] == sum(layout.numel) * 4
            continue
        current = active.get(step, current)
        assert ours[step] == (sum(layout.numel[b] for b in current) + always_numel) * 4, step
    # DDP with find_unused_parameters=True, one block of four training: it all-reduces every bucket anyway
    ddp = {int(k): v for k, v in json.loads((runs / "ddp" / "bytes.rank0.json").read_text()).items()}
    assert sorted(ddp) == list(range(6))
    assert all(v == total * 4 for v in ddp.values())
    assert max(ours[s] for s in ours if s >= 2) < min(ddp.values())  # gamma=2 of 4 blocks (+ embeddings/head)


def test_plain_trainer_in_several_processes_is_refused():
    with pytest.raises(ValueError, match="use grass_ft.GrassTrainer"):
        _refuse_untested(SimpleNamespace(world_size=2))
    _refuse_untested(SimpleNamespace(world_size=2), without_ddp=True)


def test_resume_in_two_processes_is_exact(runs):
    # resumed from the 2-process run's checkpoint-3 (a fresh model with other weights, a fresh callback): the same
    # processes, kernels, batches and summation order as the uninterrupted run, so bit-exact
    two, resumed = runs / "two_adamw", runs / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-3", resumed / "checkpoint-3")
    for trace in ("layers.jsonl", "layers.rank1.jsonl"):
        shutil.copy(two / trace, resumed / trace)
    launch(resumed, "grass", 2, batch=2, resume=resumed / "checkpoint-3")
    w, ref = torch.load(resumed / "weights.pt"), torch.load(two / "weights.pt")
    for k in ref:
        assert torch.equal(w[k], ref[k]), k
    for trace in ("layers.jsonl", "layers.rank1.jsonl"):
        assert jsonl(resumed / trace) == jsonl(two / trace)
