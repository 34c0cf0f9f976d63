"""A second device on a machine with only a CPU, for tests of models spread over devices.

An ``Elsewhere`` tensor holds ordinary CPU data but *reports* another device, ``meta`` (the one device
type besides the CPU that a CPU-only torch build can name in autograd), and computes on the CPU. What
matters is the check: like CUDA, an operation that mixes an ``Elsewhere`` tensor with a CPU tensor
(other than a 0-d scalar, an index or an explicit copy) raises "Expected all tensors to be on the same
device", so a vector made on one device and added to a state on another fails here as it would on two
GPUs, while the numbers stay the CPU's and can be compared with the single-device model's.

Inside :func:`elsewhere`, ``x.to("meta")``, ``module.to("meta")`` and factories given ``device="meta"``
make ``Elsewhere`` tensors (``.to("cpu")`` / ``.cpu()`` bring them back, both differentiable);
``torch.inference_mode`` acts as ``torch.no_grad`` there (wrapper tensors cannot be inference tensors).
:func:`split` spreads a model over the CPU and this device as accelerate's device maps do.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parents[1]
ELSEWHERE = torch.device("meta")
CPU = torch.device("cpu")
aten = torch.ops.aten
_COPIES = {aten.copy_.default, aten._to_copy.default}  # cross-device by design
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _is_elsewhere(device: Any) -> bool:
    return device is not None and torch.device(device).type == ELSEWHERE.type


class Elsewhere(torch.Tensor):
    """CPU data reporting ``device`` (see the module docstring)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, device: torch.device = ELSEWHERE) -> Elsewhere:
        if data.device.type != "cpu" or type(data) is not torch.Tensor:
            raise TypeError(f"Elsewhere holds a plain CPU tensor, not a {type(data).__name__} on {data.device}")
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=device,
            requires_grad=data.requires_grad,
            layout=data.layout,
        )
        out.inner = data
        return out

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Elsewhere({self.inner!r}, device={self.device})"

    def __tensor_flatten__(self) -> tuple[list[str], torch.device]:
        return ["inner"], self.device

    @staticmethod
    def __tensor_unflatten__(inner: dict, device: torch.device, size: Any, stride: Any) -> Elsewhere:
        return Elsewhere(inner["inner"], device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        devices = {x.device for x in flat if isinstance(x, Elsewhere)}
        if func not in _COPIES and func not in _INDEXING:  # CPU indices and 0-d CPU scalars may mix
            devices |= {x.device for x in flat if type(x) is torch.Tensor and x.dim() > 0}
        if len(devices) > 1 and func not in _COPIES:
            found = ", ".join(sorted(map(str, devices)))
            raise RuntimeError(f"Expected all tensors to be on the same device, but found {found} ({func})")
        if "device" in kwargs and kwargs["device"] is not None:
            out_device = torch.device(kwargs["device"])
            kwargs["device"] = CPU
        elif func is aten.copy_.default:
            out_device = args[0].device
        else:
            out_device = next(x.device for x in flat if isinstance(x, Elsewhere))
        unwrap = lambda x: x.inner if isinstance(x, Elsewhere) else x  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if out_device.type == "cpu":
            return out
        wrapped = tree_map(lambda x: Elsewhere(x, out_device) if type(x) is torch.Tensor else x, out)
        if not torch.is_inference_mode_enabled():
            return return_and_correct_aliasing(func, args, kwargs, wrapped)
        returns = func._schema.returns
        if len(returns) == 1 and returns[0].alias_info is not None and returns[0].alias_info.is_write:
            return args[0]  # an in-place op returns its input
        return wrapped


MOVES: list[tuple[tuple[int, ...], str, str]] = []  # (shape, from, to) of every copy across devices


class _There(torch.autograd.Function):
    """A CPU tensor copied to the other device; its gradient comes back to the CPU."""

    @staticmethod
    def forward(ctx, x, device):  # noqa: ANN001, ANN205
        MOVES.append((tuple(x.shape), str(x.device), str(device)))
        return Elsewhere(x.detach().clone(), device)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return (grad.inner.clone() if isinstance(grad, Elsewhere) else grad), None


class _Back(torch.autograd.Function):
    """A tensor on the other device copied to the CPU; its gradient goes back there."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.device = x.device
        MOVES.append((tuple(x.shape), str(x.device), "cpu"))
        return x.inner.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return Elsewhere(grad.clone(), ctx.device)


def _target(func: Any, args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None]:
    if func is torch.Tensor.cpu:
        return CPU, None
    if func is torch.Tensor.cuda:
        return torch.device("cuda"), None
    device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
    return device, dtype


# Composite functions whose C++ body makes tensors on its input's device directly (real meta tensors,
# without data): run on the CPU data (without autograd) and put back on the input's device.
_BY_VALUE = {torch.linalg.pinv}


def _by_value(func: Any, args: tuple, kwargs: dict) -> Any:
    flat, _ = tree_flatten((args, kwargs))
    devices = {x.device for x in flat if isinstance(x, torch.Tensor)}
    if len(devices) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found {sorted(map(str, devices))}")
    unwrap = lambda x: x.inner if isinstance(x, Elsewhere) else x  # noqa: E731
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    (device,) = devices
    return tree_map(lambda x: Elsewhere(x, device) if type(x) is torch.Tensor and device != CPU else x, out)


def _touches_elsewhere(args: tuple) -> bool:
    return any(isinstance(a, Elsewhere) for a in args)


def _cpu_index(index: Any) -> Any:
    return torch.tensor(index) if isinstance(index, list) else index


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], Elsewhere):
            return args[0].inner.tolist()
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], Elsewhere):
            # torch would make a list index, or a number to store, a tensor on the target's (fake) device,
            # with no data: make them CPU tensors, which may index and fill a tensor on any device
            index = args[1]
            index = tuple(map(_cpu_index, index)) if isinstance(index, tuple) else _cpu_index(index)
            if func is torch.Tensor.__getitem__:
                return func(args[0], index)
            value = args[2] if isinstance(args[2], torch.Tensor) else torch.tensor(args[2], dtype=args[0].dtype)
            return func(args[0], index, value)
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda):
            device, dtype = _target(func, args, kwargs)
            x = args[0]
            if device is not None and device.type == "cpu" and isinstance(x, Elsewhere):
                out = _Back.apply(x)
                return out if dtype is None else out.to(dtype)
            if _is_elsewhere(device) and not isinstance(x, Elsewhere):
                return _There.apply(x if dtype is None else x.to(dtype), device)
        if func in (torch.where, torch.Tensor.where) and len(args) == 3 and _touches_elsewhere(args):
            # the number would become a tensor on the (fake) device without data: a CPU scalar may go anywhere
            return func(*(a if isinstance(a, torch.Tensor) else torch.tensor(a) for a in args), **kwargs)
        if func in _BY_VALUE and not any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in tree_flatten((args, kwargs))[0]
        ):
            return _by_value(func, args, kwargs)
        if _is_elsewhere(kwargs.get("device")):  # a factory (or new_*) asked for the other device
            device = torch.device(kwargs["device"])
            out = func(*args, **{**kwargs, "device": CPU})
            return tree_map(lambda x: Elsewhere(x, device) if type(x) is torch.Tensor else x, out)
        return func(*args, **kwargs)


_INFERENCE = torch.autograd.grad_mode.inference_mode


def _enter_as_no_grad(self: Any) -> None:
    self._was_enabled = torch.is_grad_enabled()
    if self.mode:
        torch._C._set_grad_enabled(False)


def _exit_as_no_grad(self: Any, *exc: object) -> None:
    torch._C._set_grad_enabled(self._was_enabled)


@contextlib.contextmanager
def elsewhere() -> Iterator[None]:
    """Within: ``"meta"`` names the other device (see the module docstring)."""
    saved = _INFERENCE.__enter__, _INFERENCE.__exit__
    _INFERENCE.__enter__, _INFERENCE.__exit__ = _enter_as_no_grad, _exit_as_no_grad
    try:
        with _Mode():
            yield
    finally:
        _INFERENCE.__enter__, _INFERENCE.__exit__ = saved


def split(model: Any, readout_elsewhere: bool = True) -> Any:
    """A copy of ``model`` (call within :func:`elsewhere`) with its first half of blocks on one device and
    the rest on the other, each module moving its inputs to its own device as accelerate's device maps
    do (``benchmarks/gpu_check.py``'s ``split_model``, which splits over CUDA and the CPU on a GPU).
    ``readout_elsewhere``: the embedding and first blocks on the CPU, the later blocks, final norm and
    unembedding elsewhere (TransformerLens's ``n_devices`` layout: the readout with the last block);
    else the other way round."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    first, second = ("cpu", "meta") if readout_elsewhere else ("meta", "cpu")
    return gpu_check.split_model(model, first, second)
