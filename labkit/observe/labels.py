"""Profiler labels for the model's layers.

Each layer class says which time category it belongs to in a class attribute,
`profile_category` ("matmul", "attention", "norm/rope/activation" or "other"); while
`label_layers(model)` is entered, every call of such a layer runs inside a torch.profiler range
named `labkit::<category>`, which labkit.profile() reads. Collectives label themselves
(`labkit::communication`, see labkit.distributed). Nothing is labelled outside the block: the
hooks cost a range per layer call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

LABEL_PREFIX = "labkit::"


@contextlib.contextmanager
def label_layers(model: torch.nn.Module) -> Iterator[None]:
    open_ranges: list = []

    def enter(name: str):
        def hook(module, args):
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            open_ranges.append(rf)

        return hook

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    handles = []
    for m in model.modules():
        category = getattr(m, "profile_category", None)
        if category is not None:
            handles += [
                m.register_forward_pre_hook(enter(LABEL_PREFIX + category)),
                m.register_forward_hook(leave),
            ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
