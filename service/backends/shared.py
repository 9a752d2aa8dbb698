"""A copy of a model's module tree that shares its tensors: what a backend runs, built without touching the
model it was given."""

from __future__ import annotations

import copy

from torch import nn


def _copy(module: nn.Module) -> nn.Module:
    """A new module object with `module`'s settings, parameters and buffers, and containers of its own (children,
    parameters, buffers, hooks), so that changing the copy's leaves the original's as they were."""
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__.update({name: copy.copy(value) if isinstance(value, (dict, set)) else value
                           for name, value in vars(module).items()})
    return clone


def shared_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """Every module of the tree copied (a module reached twice is copied once), every tensor shared: the copy may
    be put in eval mode or have its modules swapped for others while the original stays exactly as it was."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = memo[id(module)] = _copy(module)
    for name, child in module._modules.items():
        clone._modules[name] = None if child is None else shared_copy(child, memo)
    return clone
