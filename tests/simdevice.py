"""A simulated accelerator for CPU-only machines: tensors on device ``simdev`` that hold CPU data.

Under :func:`simulated_device`, ``.to('simdev')``, ``module.to('simdev')`` and factories with
``device='simdev'`` give :class:`SimTensor`s; every op computes on the CPU data, and an op that mixes
a simulated-device tensor with a (non-scalar) CPU tensor raises, as real CUDA does. Ops that real torch
allows across devices (copies, ``.to``, CPU index tensors, 0-dim CPU scalars) are allowed.

``simdev`` is torch's PrivateUse1 backend renamed, with the dummy device guard of
``torch.utils.backend_registration`` (so ``.to(device)`` passes torch's C++ device checks) and this
dispatch mode as its kernels. Code under test treats it like any accelerator: it only ever sees
``placement.device``.

Why not torch's FakeTensorMode with ``cuda``: it cannot ``.to('cuda')`` a real CPU tensor (this CPU build
has no CUDA device guard), and fake tensors hold no data, so no number could be checked; ``meta``
tensors likewise hold no data. Here the numbers are real, so a stage run on the simulated device must
also give the CPU result.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

NAME = "simdev"


_LIBS: list = []  # keeps the kernel registrations alive for the process


def register() -> torch.device:
    """Rename PrivateUse1 to ``simdev`` once per process (torch allows one rename). Besides the mode,
    the backend gets the few kernels torch calls with Python dispatch excluded (``torch.tensor(...,
    device=...)`` allocates and copies in C++)."""
    if torch._C._get_privateuse1_backend_name() != NAME:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(NAME)
        # a real backend's module says which dtypes autocast supports; torch.utils.checkpoint asks every
        # registered backend for its autocast state, so without this any later checkpointed forward fails
        getattr(torch, NAME).get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16]
    if not _LIBS:
        lib = torch.library.Library("aten", "IMPL")

        def empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
            return SimTensor(torch.empty_strided(size, stride, dtype=dtype))

        def empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
            return SimTensor(torch.empty(size, dtype=dtype))

        def copy_from(src, dst, non_blocking=False):
            dst_data = dst.elem if isinstance(dst, SimTensor) else dst
            dst_data.copy_(src.elem if isinstance(src, SimTensor) else src)
            return dst

        lib.impl("empty_strided", empty_strided, "PrivateUse1")
        lib.impl("empty.memory_format", empty, "PrivateUse1")
        lib.impl("_copy_from", copy_from, "PrivateUse1")
        _LIBS.append(lib)
    return torch.device(NAME, 0)

aten = torch.ops.aten

# ops that real torch runs with operands on different devices: copies, and index ops whose index tensors
# (given in a list) may stay on the CPU
_COPIES = {aten.copy_.default, aten._to_copy.default, aten.lift_fresh.default, aten.detach.default,
           aten.alias.default, aten.set_.source_Tensor}
_INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class MixedDeviceError(RuntimeError):
    pass


class SimTensor(torch.Tensor):
    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=torch.device(NAME, 0), requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def __repr__(self):
        return f"SimTensor({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # reached when a region suspends dispatch modes (e.g. transformers' dynamo-disabled mask helpers)
        return _dispatch(func, args, kwargs)


def _is_sim(dev) -> bool:
    return dev is not None and torch.device(dev).type == NAME


def _dispatch(func, args, kwargs):
    kwargs = dict(kwargs or {})
    flat, _ = tree_flatten((args, kwargs))
    if func is aten._has_compatible_shallow_copy_type.default:
        # a simulated tensor and a CPU one are different tensor types: Module.to makes new Parameters
        return isinstance(args[0], SimTensor) == isinstance(args[1], SimTensor)
    kinds = set()
    # index ops take CPU *index* tensors (passed in a list) with device data; values must be on the device
    direct = list(args) + list(kwargs.values()) if func in _INDEX_OPS else flat
    for x in direct:
        if isinstance(x, SimTensor):
            kinds.add(NAME)
        elif isinstance(x, torch.Tensor) and not (x.dim() == 0 and x.device.type == "cpu"):
            kinds.add(x.device.type)
    if len(kinds) > 1 and func not in _COPIES:
        shapes = [(type(x).__name__, tuple(x.shape)) for x in flat if isinstance(x, torch.Tensor)]
        raise MixedDeviceError(f"{func} mixes devices {sorted(kinds)}: {shapes}")
    target = kwargs.get("device")
    if target is not None:
        kwargs["device"] = torch.device("cpu") if _is_sim(target) else target
    wrappers = {}

    def unwrap(x):
        if isinstance(x, SimTensor):
            wrappers[id(x.elem)] = x
            return x.elem
        return x

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if target is not None:
        on_sim = _is_sim(target)
    elif func in (aten.copy_.default,):
        return args[0]
    else:
        on_sim = NAME in kinds

    def wrap(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor):
            if id(x) in wrappers:  # in-place op or alias returning its input
                return wrappers[id(x)]
            return SimTensor(x) if on_sim else x
        return x

    return tree_map(wrap, out)


class SimulatedDevice(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return _dispatch(func, args, kwargs)


@contextlib.contextmanager
def simulated_device():
    """Inside, ``simdev`` is a working device (see the module docstring); yields the mode (``.ops``)."""
    register()
    mode = SimulatedDevice()
    with mode:
        yield mode


def to_plain(x):
    """A plain CPU tensor from a simulated-device, real-device or CPU tensor, for comparisons outside the mode."""
    return x.elem if isinstance(x, SimTensor) else x.cpu()


def device_under_test() -> tuple[torch.device, "contextlib.AbstractContextManager", bool]:
    """``(device, context, real)``: the simulated device and :func:`simulated_device`, or, when
    ``MIXSPARSE_TEST_DEVICE`` names a real accelerator (``cuda``), that device and a no-op context."""
    import os

    real = os.environ.get("MIXSPARSE_TEST_DEVICE")
    if real:
        dev = torch.device(real)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"MIXSPARSE_TEST_DEVICE={real} but torch sees no CUDA device")
        return dev, contextlib.nullcontext, True
    return register(), simulated_device, False
