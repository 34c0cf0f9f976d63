"""The lens family: what turns a site's residual states into the states the model's own final norm
and unembedding read.

- :mod:`~tl_logitlens.lenses.protocol`: the :class:`Lens` protocol, the logit lens, and
  :func:`resolve_lens` (what an analysis does with its ``lens=`` argument);
- :mod:`~tl_logitlens.lenses.fingerprint`: what ties a lens to a model (a readout fingerprint, the
  stream's centring);
- :mod:`~tl_logitlens.lenses.tuned`: the tuned lens and its files; its training in
  :mod:`~tl_logitlens.lenses.tuned_training`;
- :mod:`~tl_logitlens.lenses.jacobian`: the Jacobian lens (J-lens) and its files; its fitting in
  :mod:`~tl_logitlens.lenses.jacobian_fitting`;
- :mod:`~tl_logitlens.lenses.files`: this package's lens folders, and reading other tools' files safely;
- :mod:`~tl_logitlens.lenses.loading`: :func:`load_lens`, for every format and the built-in lenses;
- :mod:`~tl_logitlens.lenses.published`: the field's published lenses (Neuronpedia's J-lenses, tuned-lens's
  tuned lenses) by name, from a pinned registry through the Hugging Face cache.

Layers read one way: this package uses the core modules (readout, corpus, inputs, ...) and is used by
the analyses; it never imports an analysis, a figure or the report.
"""

from tl_logitlens.lenses.jacobian import JacobianLens
from tl_logitlens.lenses.jacobian_fitting import fit_jacobian_lens
from tl_logitlens.lenses.loading import load_lens
from tl_logitlens.lenses.protocol import (
    LOGIT_LENS,
    Lens,
    LogitLens,
    check_reads,
    default_sites,
    lens_default_sites,
    lens_name,
    named_lenses,
    resolve_lens,
    sites_or_default,
)
from tl_logitlens.lenses.published import PublishedLens, published_lenses
from tl_logitlens.lenses.tuned import TunedLens
from tl_logitlens.lenses.tuned_training import train_tuned_lens

__all__ = [
    "LOGIT_LENS",
    "JacobianLens",
    "Lens",
    "LogitLens",
    "PublishedLens",
    "TunedLens",
    "check_reads",
    "default_sites",
    "fit_jacobian_lens",
    "lens_default_sites",
    "lens_name",
    "load_lens",
    "named_lenses",
    "published_lenses",
    "resolve_lens",
    "sites_or_default",
    "train_tuned_lens",
]
