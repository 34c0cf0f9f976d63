"""tl_logitlens: an exact, memory-bounded logit lens for TransformerLens models."""

from tl_logitlens.attribution import (
    AttributionResult,
    ComponentLensResult,
    component_lens,
    direct_logit_attribution,
)
from tl_logitlens.directions import NORM_VIEWS, DirectionResult, direction_lens, logit_diff
from tl_logitlens.evaluate import LensEvaluation, evaluate_lenses
from tl_logitlens.inputs import Batch, prepare_inputs
from tl_logitlens.lens import LensResult, logit_lens
from tl_logitlens.masked import MaskedLensResult, SlidingMaskResult, masked_lens, sliding_mask_lens
from tl_logitlens.models import load_model
from tl_logitlens.profile import DepthProfile, depth_profile
from tl_logitlens.reporting import report
from tl_logitlens.tokens import display_tokens
from tl_logitlens.tuned import TunedLens
from tl_logitlens.tuned_io import load_lens
from tl_logitlens.tuned_train import train_tuned_lens

__all__ = [
    "TunedLens",
    "train_tuned_lens",
    "AttributionResult",
    "Batch",
    "component_lens",
    "ComponentLensResult",
    "direct_logit_attribution",
    "direction_lens",
    "DirectionResult",
    "evaluate_lenses",
    "display_tokens",
    "LensEvaluation",
    "LensResult",
    "load_lens",
    "load_model",
    "logit_diff",
    "logit_lens",
    "masked_lens",
    "sliding_mask_lens",
    "depth_profile",
    "MaskedLensResult",
    "SlidingMaskResult",
    "DepthProfile",
    "NORM_VIEWS",
    "prepare_inputs",
    "report",
]
__version__ = "0.1.0"
