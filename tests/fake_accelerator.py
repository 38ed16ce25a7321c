"""A stand-in accelerator for CPU-only machines: device bugs of the GPU path, caught on the CPU.

Inside ``with FakeAccelerator() as acc:`` tensors created on (or moved to) ``acc.device``
(torch's ``meta`` device type, i.e. "not cpu") are ``AccelTensor``s: they hold real CPU data,
so results equal a CPU run, but they report the accelerator device and behave like CUDA
tensors where CPU code would silently work:

* an op mixing an accelerator tensor with a CPU tensor of one or more dimensions raises
  (CUDA: "Expected all tensors to be on the same device"); 0-dim CPU tensors are allowed,
  as on CUDA;
* ``.numpy()`` raises (device is not cpu); ``.cpu()`` / ``.to('cpu')`` give plain tensors;
* host synchronisations (``.item()``, ``.tolist()``, ``bool()``, ``torch.equal``, ``nonzero``,
  boolean indexing, copies to the host ...) are counted, with their call sites;
* every non-view aten op on accelerator tensors is counted (a lower bound on kernel launches),
  and host-to-device copies are counted too.

Loading a file with ``map_location=acc.device`` gives torch's real, data-less ``meta`` tensors,
which fail as soon as their data is needed, as device tensors do in ``torch.set_rng_state``.
"""
from __future__ import annotations

import collections
import traceback
import warnings
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")

# aten ops that make the host wait for the device (their result decides host-side control flow).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "repeat_interleave", "allclose", "is_set_to",
})

_ACTIVE: list["FakeAccelerator"] = []


class DeviceMismatch(RuntimeError):
    """A CPU tensor was mixed with accelerator tensors (a device bug on a GPU)."""


def _call_site() -> str:
    """The innermost frame of project code (not torch, not this file)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/torch/" not in name and "site-packages" not in name and not name.endswith("fake_accelerator.py"):
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


class AccelTensor(torch.Tensor):
    """A tensor on the stand-in accelerator; its CPU data is ``self.elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            device=DEVICE, requires_grad=elem.requires_grad,
        )
        out.elem = elem
        return out

    def __repr__(self) -> str:  # printing copies to the host on a GPU too
        _count_sync("repr")
        return f"AccelTensor({self.elem!r})"

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert an accelerator tensor to numpy; use Tensor.cpu() to copy it to the host first")

    def tolist(self):
        _count_sync("tolist")
        return self.elem.tolist()

    def __reduce_ex__(self, protocol):
        # torch.save of a device tensor stores its data; loading it back gives a CPU tensor
        # unless map_location says otherwise (good enough for checkpoints written in tests).
        return self.elem.detach().__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _count_sync(what: str) -> None:
    for acc in _ACTIVE:
        acc.syncs += 1
        acc.sync_sites[f"{_call_site()} ({what})"] += 1


def _is_device(value: Any) -> bool:
    return value is not None and torch.device(value).type == DEVICE.type


def _run(func, args, kwargs):
    name = func.overloadpacket.__name__
    on_device = False
    host_tensors: list[tuple[int, ...]] = []

    def unwrap(value):
        nonlocal on_device
        if isinstance(value, AccelTensor):
            on_device = True
            return value.elem
        if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dim() > 0:
            host_tensors.append(tuple(value.shape))
        return value

    args, kwargs = tree_map(unwrap, args), tree_map(unwrap, dict(kwargs))
    target = kwargs.get("device")
    to_device = _is_device(target)
    to_host = target is not None and torch.device(target).type == "cpu"
    if to_device:
        kwargs["device"] = torch.device("cpu")
    copy_op = name in ("_to_copy", "copy_", "to", "_copy_from", "_copy_from_and_resize")
    if on_device and host_tensors and not copy_op:
        raise DeviceMismatch(
            f"aten.{name} at {_call_site()}: CPU tensor(s) of shape {host_tensors} mixed with accelerator tensors"
        )
    for acc in _ACTIVE:
        if on_device or to_device:
            if not func.is_view:
                acc.ops += 1
                acc.op_names[name] += 1
            if to_device and not on_device and copy_op:
                acc.host_to_device += 1
                acc.h2d_sites[_call_site()] += 1
    if on_device and (name in SYNC_OPS or (copy_op and to_host)):
        _count_sync(name)
    if on_device and name == "index" and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
    ):
        _count_sync("boolean index")
    out = func(*args, **kwargs)
    if name == "copy_" and on_device and isinstance(args[0], torch.Tensor):
        return out if not isinstance(out, torch.Tensor) else _wrap_like(out, on_device and not to_host)
    if (on_device and not to_host) or to_device:
        if name in ("_local_scalar_dense", "equal", "is_nonzero", "allclose"):
            return out
        return tree_map(lambda t: AccelTensor(t) if isinstance(t, torch.Tensor) and not isinstance(t, AccelTensor) else t, out)
    return out


def _wrap_like(out: torch.Tensor, device: bool):
    return AccelTensor(out) if device else out


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class FakeAccelerator:
    """Context manager: while active, ``self.device`` is a working stand-in accelerator.

    Counters (reset with ``reset()``): ``ops`` (non-view aten ops on the device, by name in
    ``op_names``), ``syncs`` (host synchronisations, by call site in ``sync_sites``) and
    ``host_to_device`` copies (by call site in ``h2d_sites``).
    """

    device = DEVICE

    def __init__(self) -> None:
        self._mode = _Mode()
        self._patched: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self.ops = 0
        self.syncs = 0
        self.host_to_device = 0
        self.op_names: collections.Counter = collections.Counter()
        self.sync_sites: collections.Counter = collections.Counter()
        self.h2d_sites: collections.Counter = collections.Counter()

    def __enter__(self) -> "FakeAccelerator":
        # torch.tensor / as_tensor with device=... build the data outside the dispatcher: make them
        # build a CPU tensor and move it, which the mode sees.
        for fname in ("tensor", "as_tensor", "asarray"):
            original = getattr(torch, fname)
            self._patched[fname] = original

            def factory(*args, _original=original, **kwargs):
                if _is_device(kwargs.get("device")):
                    kwargs["device"] = "cpu"
                    return _original(*args, **kwargs).to(DEVICE)
                if args and isinstance(args[0], AccelTensor) and kwargs.get("device") is None:
                    dtype = kwargs.get("dtype")
                    return args[0] if dtype in (None, args[0].dtype) else args[0].to(dtype)
                return _original(*args, **kwargs)

            setattr(torch, fname, factory)
        # load_state_dict warns that copying into a 'meta' parameter is a no-op; here it is not
        # (the copy lands in the CPU data), so the warning would only be noise.
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        self._mode.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self._mode.__exit__(*exc)
        for fname, original in self._patched.items():
            setattr(torch, fname, original)
        self._patched.clear()
        self._warnings.__exit__(*exc)

    def on_device(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, AccelTensor)
