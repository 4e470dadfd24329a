"""Test fixtures around trustswarm.testing.local_verifier (re-exported for the tests)."""

from __future__ import annotations

import pytest
import torch

from trustswarm.testing.local_verifier import (  # noqa: F401 - re-exported
    RunningVerifier,
    server_ctx,
    start_verifier,
    stop_verifier,
    wait_until,
)


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """The tiny model's ops are too small to gain from threads; on a loaded 2-core
    machine torch's thread pool makes each op 10-100x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
