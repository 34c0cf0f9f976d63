"""Every analysis that reads a model through a lens (``lens=``): the logit lens (:mod:`.predictions`),
logit differences and directions (:mod:`.directions`), direct logit attribution (:mod:`.attribution`,
its linear algebra in :mod:`.dla_algebra`, token pairs in :mod:`.token_pairs`), the masked-LM lens
(:mod:`.masked`), depth profiles (:mod:`.profile`), corpus evaluation (:mod:`.evaluate`), lens
comparison (:mod:`.lens_comparison`), steering (:mod:`.steering`), the lens vector dictionary
(:mod:`.lens_dictionary`), J-space decomposition, occupancy and fraction of variance (:mod:`.jspace`, its
sparse solvers in :mod:`.pursuit`) and coordinate patching and swaps (:mod:`.patching`).

Each is one entry function returning one frozen result. The modules are private: their paths may change
between releases; the public names are in :mod:`tl_logitlens` itself.
"""
