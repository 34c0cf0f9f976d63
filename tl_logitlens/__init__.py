"""tl_logitlens: an exact, memory-bounded logit lens for TransformerLens models."""

from tl_logitlens.inputs import Batch, prepare_inputs
from tl_logitlens.lens import LensResult, logit_lens
from tl_logitlens.models import load_model
from tl_logitlens.tokens import display_tokens

__all__ = [
    "Batch",
    "LensResult",
    "display_tokens",
    "load_model",
    "logit_lens",
    "prepare_inputs",
]
__version__ = "0.1.0"
