"""Deprecated: the logit lens analysis (``logit_lens``, ``LensResult``) moved to
:mod:`tl_logitlens.analyses.predictions` (beside the lens family in :mod:`tl_logitlens.lenses`); this stub
forwards to it until tl_logitlens 0.3."""

from tl_logitlens.core.moved import forwarder

__getattr__ = forwarder(
    "tl_logitlens.lens",
    {
        name: "tl_logitlens.analyses.predictions"
        for name in ("logit_lens", "LensResult", "DEFAULT_CHUNK_SIZE", "DEFAULT_MAX_LOGPROBS_BYTES")
    },
)
