"""The floor under the lenses: what every lens and analysis stands on.

Running a model and caching its states (:mod:`.run`), reading sites and unembedding them (:mod:`.readout`,
the tiled metric kernel :mod:`.kernel`), inputs and tokens (:mod:`.inputs`, :mod:`.tokens`), loading
models and encoders (:mod:`.models`, :mod:`.encoders`), what every result shares (:mod:`.results`,
:mod:`.frames`, :mod:`.measures`), files and checkpoints (:mod:`.files`), corpora (:mod:`.corpus`),
data-parallel runs (:mod:`.distributed`), the two TransformerLens versions (:mod:`.compat`) and the
deprecation forwarder of moved modules (:mod:`.moved`). It imports nothing above it.

The modules are private: their paths may change between releases; the public names are in
:mod:`tl_logitlens` itself.
"""
