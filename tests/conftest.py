"""Shared test setup: CPU only, one torch thread (tiny presets), deterministic seeds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast and never oversubscribes a shared machine


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
