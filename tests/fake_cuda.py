"""Fake CUDA on a CPU-only machine, for checking that the package keeps every tensor on the device of its inputs.

`fake_cuda()` is a dispatch mode under which `device="cuda"` works without a GPU: a "cuda" tensor is a `CudaTagged`
wrapper of a real CPU tensor that reports `device == cuda:0` (and so takes every `device.type == "cuda"` branch of
the package and of torch, autocast on "cuda" included). Every aten op is computed on the wrapped CPU values, so
data-dependent ops (nonzero, boolean masks, NMS, `.item()`, `.tolist()`) just run, and the outputs are compared with a
plain CPU run. Its device rules:

- an op whose tensor inputs are all cuda gives cuda outputs; all cpu gives cpu outputs;
- an op that mixes a cuda tensor with a CPU tensor of one or more dimensions raises `DeviceMixError`, naming the op
  and the package line, unless it is a copy (`.to(...)`, `copy_`): stricter than CUDA itself, which also accepts
  CPU index tensors (a host-to-device copy and a synchronisation on every call). That is the rule the package
  follows: a tensor made inside it is made on the device of its inputs;
- any other op that mixes devices (a 0-dim CPU tensor beside cuda ones, as CUDA allows) or names a device is run
  on fake copies of its inputs in torch's own `FakeTensorMode`, whose rules are CUDA's: it raises
  `FakeTensorDeviceMismatchError` where CUDA would, and gives the outputs' devices.

A factory without a device (`torch.zeros(n)`) makes a plain CPU tensor, as on a GPU machine; the first op that mixes
it with cuda tensors fails. `FakeTensorMode` stays active around the mode, which is what lets torch create "cuda"
tensors without initialising CUDA.

Backward: the autograd engine cannot run on cuda tensors without a device (it looks for the device's CUDA context),
so `fake_backward(loss)` walks the same autograd graph in Python and calls each node's backward function (the
derivative formulas the engine would call, with the engine's reduction of broadcast gradients and dtype casts),
under the same device rules; `patched_backward` makes `Tensor.backward` do that, for code that calls it (the
Trainer). `cuda_amp_available` lets `torch.autocast("cuda")` and `GradScaler("cuda")` switch on without a GPU.

What it cannot check: the numerical kernels of CUDA (every value is computed by the CPU kernels), streams and
asynchrony, NCCL, real memory use, and code that calls `torch.cuda.*` functions (they need the driver).
"""

from __future__ import annotations

import contextlib
import traceback
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

CUDA = torch.device("cuda", 0)
# explicit device moves: mixing devices is what they are for
COPIES = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy.default}


class DeviceMixError(RuntimeError):
    """An op got cuda tensors and a CPU tensor of one or more dimensions."""


class CudaTagged(torch.Tensor):
    """A real CPU tensor (`elem`) that reports a cuda device; only meaningful under `fake_cuda()`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device):
        tagged = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=device, requires_grad=elem.requires_grad,
        )
        tagged.elem = elem
        return tagged

    def __repr__(self) -> str:
        return f"CudaTagged({self.elem!r})"

    def tolist(self):  # a device-to-host copy on a GPU, as here
        with unset_fake_temporarily():
            return self.elem.tolist()

    def numpy(self, *, force: bool = False):  # refused for a cuda tensor, with CUDA's message
        raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the "
                        "tensor to host memory first.")

    def __array__(self, dtype=None, copy=None):
        return self.numpy()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} got a fake cuda tensor outside fake_cuda()")


def _package_line() -> str:
    """The innermost detectron_res line of the current stack, for the error messages."""
    for frame in reversed(traceback.extract_stack()):
        if "/detectron_res/" in frame.filename:
            return f"{frame.filename.split('/detectron_res/')[-1]}:{frame.lineno} ({frame.line})"
    return "outside detectron_res"


def _describe(tensors: list[torch.Tensor]) -> str:
    return ", ".join(f"{t.device.type}{tuple(t.shape)}" for t in tensors)


class FakeCudaMode(TorchDispatchMode):
    """See the module docstring. `checked_by_fake` counts the ops whose devices FakeTensorMode decided."""

    def __init__(self, fake: FakeTensorMode):
        super().__init__()
        self.fake = fake
        self.ops = 0
        self.checked_by_fake = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        cuda = [t for t in tensors if isinstance(t, CudaTagged)]
        named_device = kwargs.get("device") is not None or any(isinstance(a, torch.device) for a in flat)
        if cuda and func not in COPIES and any(not isinstance(t, CudaTagged) and t.dim() > 0 for t in tensors):
            raise DeviceMixError(f"{func} mixes devices: {_describe(tensors)}, at {_package_line()}")
        if named_device or (cuda and len(cuda) < len(tensors)):
            out_devices = self._fake_devices(func, args, kwargs)
        else:
            out_devices = None  # one device in, that device out
        real_args, real_kwargs = tree_map(_to_real, (args, kwargs))
        with unset_fake_temporarily():
            out = func(*real_args, **real_kwargs)
        flat_out, spec = tree_flatten(out)
        if out_devices is None:
            out_devices = [CUDA if cuda else None] * len(flat_out)
        wrapped = [
            CudaTagged(r, d) if isinstance(r, torch.Tensor) and d is not None and d.type == "cuda" else r
            for r, d in zip(flat_out, out_devices)
        ]
        return return_and_correct_aliasing(func, args, kwargs, tree_unflatten(wrapped, spec))

    def _fake_devices(self, func, args, kwargs) -> list[torch.device | None]:
        """`func` run on fake copies of its inputs in FakeTensorMode: raises where CUDA would refuse the devices;
        returns the devices of the flattened outputs."""
        self.checked_by_fake += 1

        def to_fake(t):
            if isinstance(t, torch.Tensor):
                return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
            return t

        fake_out = func(*tree_map(to_fake, args), **tree_map(to_fake, kwargs))
        flat, _ = tree_flatten(fake_out)
        return [t.device if isinstance(t, torch.Tensor) else None for t in flat]


def _to_real(value):
    if isinstance(value, CudaTagged):
        return value.elem
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return value


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCudaMode]:
    """The fake CUDA device (module docstring). FakeTensorMode is entered first (its presence keeps torch from
    initialising CUDA for a `device="cuda"` argument) and answers only the ops that `FakeCudaMode` hands it. cuDNN is
    switched off, so that batch norm on cuda tensors is the native op (the CPU has no cudnn_batch_norm kernel)."""
    with torch.backends.cudnn.flags(enabled=False), FakeTensorMode(shape_env=ShapeEnv()) as fake:
        with FakeCudaMode(fake) as mode:
            yield mode


def to_fake_cuda(module: nn.Module) -> nn.Module:
    """Moves `module`'s parameters and buffers to the fake cuda device in place (inside `fake_cuda()`); as
    `module.to("cuda")`, which cannot swap a CPU parameter for a tensor of another class."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(param.detach().to(CUDA), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = buffer.to(CUDA)
    return module


def to_cpu(value):
    """Outputs (tensors in nested lists, tuples and dicts) as plain CPU tensors, for comparing with a CPU run."""
    return tree_map(lambda t: t.elem if isinstance(t, CudaTagged) else t, value)


@torch.no_grad()
def fake_backward(root: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    """`root.backward(grad)` without the autograd engine: each node of the graph is called once all the gradients
    flowing into it are summed; a leaf's gradient is accumulated into `.grad` (see the module docstring)."""
    if root.grad_fn is None:
        raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
    pending = defaultdict(int)  # node -> gradients still to arrive
    seen, stack = set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                pending[child] += 1
                stack.append(child)
    inputs = defaultdict(dict)  # node -> {input slot: summed gradient}
    inputs[root.grad_fn][0] = torch.ones_like(root) if grad is None else grad
    ready = [root.grad_fn]
    while ready:
        node = ready.pop()
        grads = inputs.pop(node, {})
        if type(node).__name__ == "AccumulateGrad":
            variable = node.variable
            if 0 in grads:
                variable.grad = grads[0] if variable.grad is None else variable.grad + grads[0]
            continue
        args = [grads.get(slot) for slot in range(len(node._input_metadata))]
        outs = node(*args) if callable(node) else node.apply(*args)  # C++ nodes, or a Python Function's
        outs = outs if isinstance(outs, tuple) else (outs,)
        for (child, slot), g in zip(node.next_functions, outs):
            if child is None:
                continue
            if g is not None:
                meta = child._input_metadata[slot]
                if tuple(g.shape) != tuple(meta.shape):
                    g = g.sum_to_size(meta.shape)  # a broadcast input's gradient, reduced as the engine does
                if g.dtype != meta.dtype:
                    g = g.to(meta.dtype)
                if g.device != meta.device:
                    raise DeviceMixError(f"{node.name()} gives a {g.device} gradient to a {meta.device} input")
                inputs[child][slot] = g if slot not in inputs[child] else inputs[child][slot] + g
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)


@contextlib.contextmanager
def patched_backward() -> Iterator[None]:
    """`Tensor.backward` as `fake_backward`, for code under test that calls it."""
    original = torch.Tensor.backward
    torch.Tensor.backward = lambda self, gradient=None, *args, **kwargs: fake_backward(self, gradient)
    try:
        yield
    finally:
        torch.Tensor.backward = original


def cuda_amp_available(monkeypatch) -> None:
    """Lets `torch.autocast("cuda", ...)` and `torch.amp.GradScaler("cuda")` switch on without a GPU (they check
    for a CUDA device and for bfloat16 support first)."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
