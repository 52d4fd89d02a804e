"""The one place that owns what this package keeps on torch modules it did not create.

Every such value lives in one record per module, ``module.__dict__["_sd35fp8"]`` (a :class:`Marks`), read with
:func:`peek` and created with :func:`marks`. A forward replaced on a module instance goes through
:func:`install_forward` / :func:`restore_forward`, which record which one is installed. Nothing else in the package
sets private attributes or ``forward`` on a module it did not build.
"""
from __future__ import annotations

import dataclasses
import types

import torch

ATTR = "_sd35fp8"


@dataclasses.dataclass(eq=False)
class Marks:
    # methods replaced on the module instance, by name: the kind installed ("forward": "fused_mlp", "joint_block";
    # "cropped_pos_embed": "fp8_pos_embed")
    methods: dict = dataclasses.field(default_factory=dict)
    # a joint block with the installed forward: it also runs the LayerNorm kernels (sd35fp8.kernels.norm)
    joint_norm: bool = True
    # the static runtime on a model (sd35fp8.runtime.static): its config as a tuple, and what it left on each layer
    static_key: tuple | None = None
    static_state: list | None = None
    # CUDA graphs of a model (sd35fp8.runtime.graphs): its cached parameter/buffer dicts and probe tensors
    tensor_dicts: tuple | None = None
    probe: list | None = None
    # an FP8 layer under TransformerEngine (sd35fp8.runtime.te): its te.Linear per activation dtype, the recipe key
    # they were built for, the TE recipe and margin it runs with, and whether TE's routing made it weight-only
    te_modules: dict | None = None
    te_key: tuple | None = None
    te_config: dict | None = None
    te_weight_only: bool = False
    # a te.Linear built on an FP8 layer's weight: that weight's address
    te_weight_ptr: int | None = None
    # the adapter's own per-model state (the ComfyUI node layer: scales installed, compiled module, graph runners)
    adapter: dict = dataclasses.field(default_factory=dict)


def peek(module: torch.nn.Module) -> Marks | None:
    """The module's record, or None if it has none. Wrappers that forward attribute reads to the module they wrap
    (``torch.compile``'s OptimizedModule, ``sd35fp8.runtime.graphs.GraphedModule``) give the wrapped module's."""
    return getattr(module, ATTR, None)


def marks(module: torch.nn.Module) -> Marks:
    """The module's record (or its wrapped module's, as :func:`peek`), created on first use."""
    m = peek(module)
    if m is None:
        m = module.__dict__[ATTR] = Marks()
    return m


def install_method(module: torch.nn.Module, name: str, kind: str, fn) -> None:
    """Replace ``module``'s method ``name`` with ``fn`` bound to it, once: the same kind again keeps the bound method
    (a new object each time would fail torch.compile's guards)."""
    m = marks(module)
    if m.methods.get(name) != kind:
        module.__dict__[name] = types.MethodType(fn, module)
        m.methods[name] = kind


def restore_method(module: torch.nn.Module, name: str, kind: str) -> bool:
    """Give ``module`` its class's method ``name`` back if ``kind`` is installed; returns whether it was."""
    m = peek(module)
    if m is None or m.methods.get(name) != kind:
        return False
    module.__dict__.pop(name, None)
    del m.methods[name]
    return True


def installed(module: torch.nn.Module, name: str = "forward") -> str | None:
    """The kind of method ``name`` installed on ``module`` (None: the class's own)."""
    m = peek(module)
    return None if m is None else m.methods.get(name)


def install_forward(module: torch.nn.Module, kind: str, fn) -> None:
    install_method(module, "forward", kind, fn)


def restore_forward(module: torch.nn.Module, kind: str) -> bool:
    return restore_method(module, "forward", kind)
