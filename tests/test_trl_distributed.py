"""TRL's SFTTrainer with GrassTrainerMixin in 2 processes (torchrun, gloo, CPU): it trains, and both ranks end with
equal weights and identical traces (tests/trl_dist_worker.py); the mixin's version check is one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from grass_ft.frontends.hf import GrassTrainer, GrassTrainerMixin, grass_trainer, grass_trainer_unsupported  # noqa: E402
from tiny import char_tokenizer, tiny_llama  # noqa: E402

WORKER = str(Path(__file__).parent / "trl_dist_worker.py")


def test_grass_trainer_wraps_any_trainer_subclass():
    from transformers import Trainer
    from trl import SFTTrainer

    cls = grass_trainer(SFTTrainer)
    assert issubclass(cls, GrassTrainerMixin) and issubclass(cls, SFTTrainer)
    assert cls.__mro__[1] is GrassTrainerMixin  # the mixin's overrides come first
    assert grass_trainer(GrassTrainer) is GrassTrainer and issubclass(GrassTrainer, Trainer)
    with pytest.raises(TypeError, match="takes a transformers.Trainer subclass"):
        grass_trainer(dict)


def test_missing_private_hooks_are_one_line_naming_the_tested_versions():
    from transformers import Trainer

    class Renamed(Trainer):  # a release where the private hook is gone
        _wrap_model = None

    why = grass_trainer_unsupported(Renamed)
    assert why is not None and "Renamed._wrap_model" in why and "tested with transformers" in why
    assert "\n" not in why
    with pytest.raises(RuntimeError, match="needs Renamed._wrap_model"):
        grass_trainer(Renamed)
    assert grass_trainer_unsupported(Trainer) is None  # the installed versions have them


@pytest.mark.slow
def test_sft_trainer_with_the_mixin_trains_equally_on_two_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRASS_FT_TRACE_ALL_RANKS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", WORKER, str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    w0, w1 = (torch.load(tmp_path / f"weights.rank{k}.pt") for k in (0, 1))
    init = {n: p.detach() for n, p in tiny_llama(len(char_tokenizer()), layers=4, seed=0).named_parameters()}
    # both ranks apply the same all-reduced gradients with the same kernels: bit-equal, not merely close (a rank
    # that skipped the all-reduce, or a DDP wrapper averaging other buckets, parts them at the first update)
    for n in w0:
        assert torch.equal(w0[n], w1[n]), n
    assert sum(not torch.equal(w0[n], init[n]) for n in w0) > 0  # and they trained
    assert (tmp_path / "layers.jsonl").read_text() == (tmp_path / "layers.rank1.jsonl").read_text()
    assert "draw" in (tmp_path / "layers.jsonl").read_text()
