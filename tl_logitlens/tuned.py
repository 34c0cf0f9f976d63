"""Deprecated: the tuned lens moved to :mod:`tl_logitlens.lenses.tuned` (and
:mod:`tl_logitlens.lenses.fingerprint`); this stub forwards to it until tl_logitlens 0.3."""

from tl_logitlens.core.moved import forwarder

__getattr__ = forwarder(
    "tl_logitlens.tuned",
    {
        "TunedLens": "tl_logitlens.lenses.tuned",
        "FORMAT_VERSION": "tl_logitlens.lenses.tuned",
        "readout_fingerprint": "tl_logitlens.lenses.fingerprint",
        "fingerprint_distance": "tl_logitlens.lenses.fingerprint",
        "writing_weights_centred": "tl_logitlens.lenses.fingerprint",
        "FINGERPRINT_ATOL": "tl_logitlens.lenses.fingerprint",
        "FINGERPRINT_ATOL_16BIT": "tl_logitlens.lenses.fingerprint",
    },
)
