"""tl_logitlens: an exact, memory-bounded logit lens for TransformerLens models.

Every public name is importable from here (``import tl_logitlens as tl; tl.logit_lens(...)``). They
are loaded on first use (PEP 562), so ``import tl_logitlens`` and the command line's ``--help`` do
not pay for torch and TransformerLens until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# each public name and the module that defines it
_EXPORTS: dict[str, str] = {
    # lenses
    "Lens": "tl_logitlens.lenses",
    "TunedLens": "tl_logitlens.lenses",
    "JacobianLens": "tl_logitlens.lenses",
    "fit_jacobian_lens": "tl_logitlens.lenses",
    "load_lens": "tl_logitlens.lenses",
    "PublishedLens": "tl_logitlens.lenses",
    "published_lenses": "tl_logitlens.lenses",
    "train_tuned_lens": "tl_logitlens.lenses",
    # inputs
    "Batch": "tl_logitlens.core.inputs",
    "prepare_inputs": "tl_logitlens.core.inputs",
    "display_tokens": "tl_logitlens.core.tokens",
    "visible_token": "tl_logitlens.core.tokens",
    "load_model": "tl_logitlens.core.models",
    "demo_texts": "tl_logitlens.core.corpus",
    # analyses
    "LensResult": "tl_logitlens.analyses.predictions",
    "logit_lens": "tl_logitlens.analyses.predictions",
    "NORM_VIEWS": "tl_logitlens.analyses.directions",
    "DirectionResult": "tl_logitlens.analyses.directions",
    "direction_lens": "tl_logitlens.analyses.directions",
    "logit_diff": "tl_logitlens.analyses.directions",
    "AttributionResult": "tl_logitlens.analyses.attribution",
    "ComponentLensResult": "tl_logitlens.analyses.attribution",
    "component_lens": "tl_logitlens.analyses.attribution",
    "direct_logit_attribution": "tl_logitlens.analyses.attribution",
    "MaskedLensResult": "tl_logitlens.analyses.masked",
    "SlidingMaskResult": "tl_logitlens.analyses.masked",
    "masked_lens": "tl_logitlens.analyses.masked",
    "sliding_mask_lens": "tl_logitlens.analyses.masked",
    "DepthProfile": "tl_logitlens.analyses.profile",
    "depth_profile": "tl_logitlens.analyses.profile",
    "LensComparison": "tl_logitlens.analyses.lens_comparison",
    "compare_lenses": "tl_logitlens.analyses.lens_comparison",
    "lens_vectors": "tl_logitlens.analyses.steering",
    "steer": "tl_logitlens.analyses.steering",
    "ablate": "tl_logitlens.analyses.steering",
    "DecodedVector": "tl_logitlens.analyses.decode",
    "decode_vector": "tl_logitlens.analyses.decode",
    "placebo": "tl_logitlens.analyses.interventions",
    "SteeringSweep": "tl_logitlens.analyses.interventions",
    "steering_sweep": "tl_logitlens.analyses.interventions",
    "Generation": "tl_logitlens.analyses.interventions",
    "generate": "tl_logitlens.analyses.interventions",
    "Faithfulness": "tl_logitlens.analyses.faithfulness",
    "faithfulness": "tl_logitlens.analyses.faithfulness",
    "LensDictionary": "tl_logitlens.analyses.lens_dictionary",
    "lens_dictionary": "tl_logitlens.analyses.lens_dictionary",
    "lens_vector_dictionary": "tl_logitlens.analyses.lens_dictionary",
    "Decomposition": "tl_logitlens.analyses.jspace",
    "decompose": "tl_logitlens.analyses.jspace",
    "Occupancy": "tl_logitlens.analyses.jspace",
    "occupancy": "tl_logitlens.analyses.jspace",
    "JSpaceVariance": "tl_logitlens.analyses.jspace",
    "fraction_of_variance": "tl_logitlens.analyses.jspace",
    "CoordinatePatch": "tl_logitlens.analyses.patching",
    "coordinate_patch": "tl_logitlens.analyses.patching",
    "swap_hooks": "tl_logitlens.analyses.patching",
    "LensEvaluation": "tl_logitlens.analyses.evaluate",
    "evaluate_lenses": "tl_logitlens.analyses.evaluate",
    "PatchscopeLens": "tl_logitlens.analyses.patchscope",
    "PatchscopeGeneration": "tl_logitlens.analyses.patchscope",
    "TargetPrompt": "tl_logitlens.analyses.patchscope",
    "identity_prompt": "tl_logitlens.analyses.patchscope",
    "patchscope": "tl_logitlens.analyses.patchscope",
    "patchscope_generate": "tl_logitlens.analyses.patchscope",
    # the report
    "report": "tl_logitlens.reporting",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tl_logitlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    """The public names (and the subpackages already imported), not what this module imports for
    itself (``importlib``, ``Any``, ``TYPE_CHECKING``, ``annotations``)."""
    module = type(importlib)
    loaded = [n for n, v in globals().items() if isinstance(v, module) and v.__name__.startswith(f"{__name__}.")]
    return sorted({*__all__, "__version__", *loaded})


if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ loads these
    # ruff reads __all__ only as a literal list, so it cannot see that these are re-exported
    from tl_logitlens.analyses.attribution import (  # noqa: F401
        AttributionResult,
        ComponentLensResult,
        component_lens,
        direct_logit_attribution,
    )
    from tl_logitlens.analyses.decode import DecodedVector, decode_vector  # noqa: F401
    from tl_logitlens.analyses.directions import NORM_VIEWS, DirectionResult, direction_lens, logit_diff  # noqa: F401
    from tl_logitlens.analyses.evaluate import LensEvaluation, evaluate_lenses  # noqa: F401
    from tl_logitlens.analyses.faithfulness import Faithfulness, faithfulness  # noqa: F401
    from tl_logitlens.analyses.interventions import (  # noqa: F401
        Generation,
        SteeringSweep,
        generate,
        placebo,
        steering_sweep,
    )
    from tl_logitlens.analyses.jspace import (  # noqa: F401
        Decomposition,
        JSpaceVariance,
        Occupancy,
        decompose,
        fraction_of_variance,
        occupancy,
    )
    from tl_logitlens.analyses.lens_comparison import LensComparison, compare_lenses  # noqa: F401
    from tl_logitlens.analyses.lens_dictionary import LensDictionary, lens_dictionary, lens_vector_dictionary  # noqa: F401
    from tl_logitlens.analyses.masked import (  # noqa: F401
        MaskedLensResult,
        SlidingMaskResult,
        masked_lens,
        sliding_mask_lens,
    )
    from tl_logitlens.analyses.patching import CoordinatePatch, coordinate_patch, swap_hooks  # noqa: F401
    from tl_logitlens.analyses.patchscope import (  # noqa: F401
        PatchscopeGeneration,
        PatchscopeLens,
        TargetPrompt,
        identity_prompt,
        patchscope,
        patchscope_generate,
    )
    from tl_logitlens.analyses.predictions import LensResult, logit_lens  # noqa: F401
    from tl_logitlens.analyses.profile import DepthProfile, depth_profile  # noqa: F401
    from tl_logitlens.analyses.steering import ablate, lens_vectors, steer  # noqa: F401
    from tl_logitlens.core.corpus import demo_texts  # noqa: F401
    from tl_logitlens.core.inputs import Batch, prepare_inputs  # noqa: F401
    from tl_logitlens.core.models import load_model  # noqa: F401
    from tl_logitlens.core.tokens import display_tokens, visible_token  # noqa: F401
    from tl_logitlens.lenses import (  # noqa: F401
        JacobianLens,
        Lens,
        PublishedLens,
        TunedLens,
        fit_jacobian_lens,
        load_lens,
        published_lenses,
        train_tuned_lens,
    )
    from tl_logitlens.reporting import report  # noqa: F401
