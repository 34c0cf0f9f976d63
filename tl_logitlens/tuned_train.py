"""Deprecated: tuned-lens training moved to :mod:`tl_logitlens.lenses.tuned_training`; this stub
forwards to it until tl_logitlens 0.3."""

from tl_logitlens.core.moved import forwarder

__getattr__ = forwarder(
    "tl_logitlens.tuned_train",
    {
        name: "tl_logitlens.lenses.tuned_training"
        for name in ("train_tuned_lens", "chunked_kl", "softmax_stats", "final_norm_f32", "lens_kl_sum", "VOCAB_CHUNK", "ROW_BLOCK")
    },
)
