from __future__ import annotations

import pytest

from tests.helpers import NORM_IDS, NORM_VARIANTS, STORIES, require_shared, tiny_model


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
