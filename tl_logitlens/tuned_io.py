"""Deprecated: tuned-lens files moved to :mod:`tl_logitlens.lenses.tuned`, :func:`load_lens` to
:mod:`tl_logitlens.lenses.loading`, reading text to :mod:`tl_logitlens.core.corpus`; this stub forwards
until tl_logitlens 0.3."""

from tl_logitlens.core.moved import forwarder

__getattr__ = forwarder(
    "tl_logitlens.tuned_io",
    {
        "load_lens": "tl_logitlens.lenses.loading",
        "WEIGHTS_FILE": "tl_logitlens.lenses.tuned",
        "CONFIG_FILE": "tl_logitlens.lenses.tuned",
        "read_texts": "tl_logitlens.core.corpus",
        "pack_windows": "tl_logitlens.core.corpus",
    },
)
