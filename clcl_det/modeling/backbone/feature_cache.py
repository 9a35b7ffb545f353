"""A bounded cache of the frozen CLIP's per-image outputs, keyed by the image's bytes."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

__all__ = ["FrozenFeatureCache"]

Outputs = Tuple[List[Tensor], Tensor]  # (token maps, dense map) of a batch


class FrozenFeatureCache:
    """`cache(encode, images)` equals `encode(images)` for a frozen `encode` whose outputs for one
    image do not depend on the other images of the batch: images seen before (same bytes, same
    autocast state) take their stored outputs, the others go through `encode` as one sub-batch.
    Least recently used entries are dropped beyond `max_bytes`. Copies share the cache."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[bytes, Tuple[List[Tensor], Tensor]]" = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._strides: Dict[Tuple[int, ...], Tuple[int, ...]] = {}  # the encoder's output strides, by (output, shape)

    def __deepcopy__(self, memo: Dict[int, object]) -> "FrozenFeatureCache":
        return self

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(image: Tensor) -> bytes:
        """A digest of the image's shape, dtype, bytes and the autocast state it is encoded under."""
        dev = image.device.type
        amp = str(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else "fp32"
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{tuple(image.shape)}|{image.dtype}|{amp}".encode())
        h.update(image.detach().contiguous().cpu().numpy().tobytes())
        return h.digest()

    def _put(self, key: bytes, value: Tuple[List[Tensor], Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in [*value[0], value[1]])
        if size > self.max_bytes:
            return
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (taps, dense) = self._entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in [*taps, dense])

    def _remember_strides(self, outputs: Outputs) -> None:
        for i, t in enumerate([*outputs[0], outputs[1]]):
            self._strides.setdefault((i, *t.shape[1:]), t.stride())

    def _assemble(self, output: int, pieces: List[Tensor]) -> Tensor:
        """The per-image `pieces` of the encoder's `output`-th tensor as one batch tensor laid out in
        memory as the encoder lays it out (later layers may pick other kernels, and round otherwise,
        for another layout)."""
        first = pieces[0]
        stride = self._strides.get((output, *first.shape))
        if stride is None:
            return torch.stack(pieces)
        out = torch.empty_strided((len(pieces), *first.shape), stride, dtype=first.dtype, device=first.device)
        for row, piece in zip(out, pieces):
            row.copy_(piece)
        return out

    def __call__(self, encode: Callable[[Tensor], Outputs], images: Tensor) -> Outputs:
        keys = [self.key(im) for im in images]
        found = {k: self._entries[k] for k in keys if k in self._entries}
        for k in found:
            self._entries.move_to_end(k)
        miss = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if len(miss) == len(keys):
            taps, dense = encode(images)
            self._remember_strides((taps, dense))
            for i, k in enumerate(keys):
                self._put(k, ([t[i].clone() for t in taps], dense[i].clone()))
            return taps, dense
        if miss:
            taps, dense = encode(images[miss])
            self._remember_strides((taps, dense))
            for j, i in enumerate(miss):
                found[keys[i]] = ([t[j].clone() for t in taps], dense[j].clone())
                self._put(keys[i], found[keys[i]])
        rows = [found[k] for k in keys]
        levels = len(rows[0][0])
        return ([self._assemble(level, [r[0][level] for r in rows]) for level in range(levels)],
                self._assemble(levels, [r[1] for r in rows]))
