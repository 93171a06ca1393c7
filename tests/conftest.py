import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from two threads, and OpenMP spin-waits when CI or a developer runs
    # something else beside the tests; one thread keeps timings stable. Numerics are unaffected.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from tiny import write_examples

    return write_examples(tmp_path_factory.mktemp("data") / "sums.jsonl")
