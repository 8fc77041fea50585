"""What a component model accepts, checked per request before Triton's batch is stacked.

Components are internal, but over gRPC every model of a repository is reachable whatever a
proxy allows, so each one checks its inputs itself: every named dimension of the declared I/O
spec (flux2_serving/contract/specs.py) must have one value across the request's tensors and lie within the
serving envelope (flux2_serving/contract/envelope.py: the same ranges as the TensorRT profiles), pixel sizes
must be multiples of 16, a reference's height x width must stay within the area that bounds the
VAE encoder's profiles, and token ids must index the vocabulary (an out-of-range gather is
undefined behaviour on a GPU). A request that fails gets INVALID_ARG alone; the rest of the
batch is served. Works on numpy arrays and torch tensors alike. No Triton import: unit-tested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


class BadInput(ValueError):
    """A request this component does not take (INVALID_ARG, this one-line message)."""


@dataclass(frozen=True)
class InputRules:
    dims: dict  # input name -> per-axis int (static) or dimension name
    ranges: dict  # dimension name -> [min, max, multiple]
    vocab_size: int = 0  # > 0: input_ids must be in [0, vocab_size)
    areas: tuple = ()  # [dimension, dimension, most elements]: products bounded beyond the ranges

    @classmethod
    def from_json(cls, text: str) -> InputRules:
        data = json.loads(text)
        return cls(data["dims"], data["ranges"], int(data.get("vocab_size", 0)),
                   tuple(tuple(limit) for limit in data.get("areas", ())))

    def check(self, feed: dict) -> None:
        """Raise BadInput naming the tensor, the dimension and the limit; None if `feed` is acceptable."""
        seen: dict[str, tuple[int, str]] = {}  # dimension name -> (size, first tensor that had it)
        for name, axes in self.dims.items():
            shape = tuple(feed[name].shape)
            if len(shape) != len(axes):
                raise BadInput(f"'{name}' has shape {list(shape)}; expected {len(axes)} dimensions {axes}")
            for size, axis in zip(shape, axes, strict=True):
                if isinstance(axis, int):
                    if size != axis:
                        raise BadInput(f"'{name}' has shape {list(shape)}; expected {axes}")
                    continue
                if axis in seen and seen[axis][0] != size:
                    raise BadInput(f"'{name}' has {axis} = {size} but '{seen[axis][1]}' has {seen[axis][0]}")
                seen.setdefault(axis, (size, name))
                low, high, multiple = self.ranges[axis]
                if not low <= size <= high or size % multiple:
                    step = f", a multiple of {multiple}" if multiple > 1 else ""
                    raise BadInput(f"'{name}' has {axis} = {size}; the serving envelope allows [{low}, {high}]{step}")
        for first, second, most in self.areas:
            if first in seen and second in seen and seen[first][0] * seen[second][0] > most:
                size = seen[first][0] * seen[second][0]
                raise BadInput(f"'{seen[first][1]}' has {first} x {second} = {seen[first][0]} x {seen[second][0]} = "
                               f"{size}; the serving envelope allows at most {most}")
        ids = feed.get("input_ids")
        if ids is not None and self.vocab_size and _count(ids):
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise BadInput(f"'input_ids' holds token id {bad}; ids must be in [0, {self.vocab_size})")
        mask = feed.get("attention_mask")
        if mask is not None and bool(((mask != 0) & (mask != 1)).any()):
            raise BadInput("'attention_mask' must hold only 0 and 1")


def _count(value) -> int:
    """Elements of a numpy array or a torch tensor."""
    return value.numel() if hasattr(value, "numel") else value.size
