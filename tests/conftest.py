import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models gain nothing from two threads, and OpenMP spin-waits when CI or a developer runs
    # something else beside the tests; one thread keeps timings stable. Session-scoped so that module fixtures
    # (e.g. the uninterrupted reference run of tests/test_resume.py) run with one thread too: a kernel may split
    # a sum differently for another thread count, and the bit-exact comparisons with subprocesses (which run with
    # OMP_NUM_THREADS=1) need the same arithmetic on both sides.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _clean_working_directory(tmp_path_factory):
    # Defaults such as output_dir=runs/grass-ft are relative: run every test from an empty directory, so that what a
    # developer's checkout holds (the run `make demo` leaves there) cannot change a test's outcome.
    import os

    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from tiny import write_examples

    return write_examples(tmp_path_factory.mktemp("data") / "sums.jsonl")
