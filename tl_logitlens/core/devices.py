"""Where a model's tensors live when its blocks sit on several devices, and the one place site states move.

A model can be spread over devices: TransformerLens 3.9's ``HookedTransformer(cfg, n_devices=...)`` (or
``move_model_modules_to_device``) puts block ``i`` on device ``i // (n_layers / n_devices)`` and the
final norm and unembedding with the last block; a ``TransformerBridge`` booted with ``device_map``
(accelerate) puts each module where the map says. The cache then holds each hook's activations on the
device of the block that wrote them, while ``W_U`` (and ``ln_final``) sit on another.

Every readout in this package runs on the **readout device**, ``W_U``'s (:func:`readout_device`): the
final norm, the unembedding, the lens's maps (a tuned lens's translators and a Jacobian lens's matrices
are made there; a lens placed elsewhere still works, its ``translate`` moving the states to its maps and
the readout moving the result back). A site's states are gathered on their own device and moved to the
readout device by :func:`site_rows`, once per site and block of rows (never per vocabulary tile: the
kernel folds every tile of a block from the one copy). :func:`to_device` is the only function that moves
them, so a test can count the moves on a machine with a single device.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int


def readout_device(model: Any) -> torch.device:
    """The device of the model's unembedding ``W_U``: where the final norm, the unembedding and the lens
    maps run, and where every analysis gathers the states it reads."""
    return model.W_U.device


def module_device(module: torch.nn.Module) -> torch.device | None:
    """The device of a module's first parameter (or buffer), None for a module with neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


def block_devices(model: Any) -> tuple[torch.device | None, ...]:
    """The device of each block (:func:`module_device` of ``model.blocks[i]``), in block order: one entry
    per block, so ``len(set(...)) > 1`` says the model is spread over several devices."""
    return tuple(module_device(block) for block in model.blocks)


def is_spread(model: Any) -> bool:
    """Whether the model's blocks or its unembedding sit on more than one device."""
    return len({*block_devices(model), readout_device(model)} - {None}) > 1


def is_on(x: torch.Tensor, device: torch.device | str) -> bool:
    """Whether ``x`` is on ``device`` already (a device named without an index, ``"cuda"``, takes any of its
    kind)."""
    device = torch.device(device)
    return x.device == device or (device.index is None and x.device.type == device.type)


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``; ``x`` itself when it is there already. Every move of a site's states to the
    readout device goes through here."""
    return x if is_on(x, device) else x.to(device)


def site_rows(
    states: Float[torch.Tensor, "batch pos d_model"],
    rows_b: Int[torch.Tensor, " row"],
    rows_p: Int[torch.Tensor, " row"],
    device: torch.device | str,
) -> Float[torch.Tensor, "row d_model"]:
    """``states[rows_b, rows_p]`` on ``device``: gathered on the states' own device (the row indices go
    there, a few bytes each) and the gathered rows moved once, so only the rows read cross devices."""
    where = states.device
    return to_device(states[rows_b.to(where), rows_p.to(where)], device)


class ReadoutCache:
    """An ``ActivationCache`` read on one device: ``cache[hook]`` is the hook's tensor moved (by
    :func:`to_device`) to ``device`` the first time it is read, and kept, so each hook crosses devices
    once. For analyses that combine every layer's output with ``W_U`` (direct logit attribution, the
    component lens); the lens itself gathers only the rows it reads (:func:`site_rows`)."""

    def __init__(self, cache: Any, device: torch.device | str) -> None:
        self.cache = cache
        self.device = torch.device(device)
        self._moved: dict[str, torch.Tensor] = {}

    def __getitem__(self, hook: str) -> torch.Tensor:
        if hook not in self._moved:
            self._moved[hook] = to_device(self.cache[hook], self.device)
        return self._moved[hook]

    def __contains__(self, hook: object) -> bool:
        return hook in self.cache

    def keys(self) -> Any:
        return self.cache.keys()


def weight_on(model: Any, tensor: torch.Tensor) -> torch.Tensor:
    """A block's weight (``W_O``, ``W_out``, a bias) on the readout device, where it meets ``W_U``."""
    return to_device(tensor, readout_device(model))


def key_value_cache(model: Any, batch_size: int) -> Any:
    """An empty TransformerLens key-value cache for a ``HookedTransformer``, each layer's entry on its own
    block's device (:func:`block_devices`), wherever the blocks were put (``n_devices``, a device map,
    ``block.to``); TransformerLens's ``init_cache`` places them by ``n_devices`` arithmetic instead."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    cfg = model.cfg
    return TransformerLensKeyValueCache(
        entries=[
            TransformerLensKeyValueCacheEntry.init_cache_entry(cfg, device or cfg.device, batch_size)
            for device in block_devices(model)
        ],
        previous_attention_mask=torch.empty((batch_size, 0), device=cfg.device, dtype=torch.int),
    )


class PlacedCopies:
    """A lens's maps on the devices of the states they read: ``on(key, tensor, device)`` is ``tensor``
    itself on its own device, elsewhere a copy made once (by :func:`to_device`) and kept while ``tensor``
    is the same, unmodified tensor (an in-place edit, such as an optimiser step, is copied again). So a
    lens made on the CPU reading a model on a GPU, or a model spread over devices, copies each map once
    per device, not once per call."""

    def __init__(self) -> None:
        self._copies: dict[tuple[Any, str], tuple[torch.Tensor, int, torch.Tensor]] = {}

    def on(self, key: Any, tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        if is_on(tensor, device):
            return tensor
        where = (key, str(torch.device(device)))
        source, version, copy = self._copies.get(where, (None, -1, None))
        if source is not tensor or version != tensor._version:
            copy = to_device(tensor.detach(), device)
            self._copies[where] = (tensor, tensor._version, copy)
        return copy
