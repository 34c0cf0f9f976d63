from __future__ import annotations

import os

# An xdist worker shares the machine's cores with the other workers: one torch thread each, and OpenMP's
# idle threads asleep rather than spinning. Set before torch loads (OpenMP reads the policy then); the
# commands the tests start inherit both. With two workers of two spinning threads each on 2 cores, a
# third of the CPU went to the kernel.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import NORM_IDS, NORM_VARIANTS, STORIES, require_shared, tiny_model  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case torch was loaded before this file


@pytest.fixture(scope="session", params=NORM_VARIANTS, ids=NORM_IDS)
def any_model(request):
    """A tiny random model in each of the four norm variants."""
    normalization, folded = request.param
    return tiny_model(normalization, folded)


@pytest.fixture(scope="session")
def ln_model():
    return tiny_model("LN", folded=False)


@pytest.fixture(scope="session")
def stories():
    from tl_logitlens import load_model

    return load_model(require_shared(STORIES))
