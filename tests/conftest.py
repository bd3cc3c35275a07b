"""Shared fixtures: tiny random models and tokenizers the tests build themselves (no hub, no ../shared)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models: one thread avoids OpenMP overhead and thrashing on small shared machines
torch.set_num_threads(1)


@pytest.fixture
def tiny_tokenizer():
    from tests.helpers import make_tiny_tokenizer

    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    from tests.helpers import make_tiny_model

    return make_tiny_model(tiny_tokenizer)
