"""A bounded cache of the frozen CLIP's per-image outputs, keyed by the image's bytes."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["FrozenFeatureCache"]

Outputs = Tuple[List[Tensor], Tensor]  # (token maps, dense map) of a batch
Signature = Tuple[Tuple[Tuple[int, ...], torch.dtype, torch.device], ...]  # per output: one image's shape, dtype, device

CHUNK_BYTES = 64 * 2**20  # entries are stored in slabs of this size, allocated as the cache fills


class _Bank:
    """The entries of one output signature (image size and precision), stored as rows of a few
    preallocated slabs rather than one small tensor per entry: small long-lived tensors interleaved
    with a training step's temporaries fragment the C allocator's heap, and the process grows far
    beyond the bytes held."""

    def __init__(self, signature: Signature):
        self.signature = signature
        self.entry_bytes = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                               for s, d, _ in signature)
        self.rows_per_chunk = max(1, CHUNK_BYTES // self.entry_bytes)
        self.slabs: List[List[Tensor]] = []  # per chunk: one tensor per output, (rows, *shape)
        self.entries: "OrderedDict[bytes, int]" = OrderedDict()  # key -> slot, least recently used first
        self.free: List[int] = []

    def rows(self, slot: int) -> List[Tensor]:
        chunk = self.slabs[slot // self.rows_per_chunk]
        return [t[slot % self.rows_per_chunk] for t in chunk]

    def grow(self, rows: int) -> int:
        """Adds a slab of `rows` slots; returns its bytes."""
        first = len(self.slabs) * self.rows_per_chunk
        self.slabs.append([torch.empty((rows, *s), dtype=d, device=dev) for s, d, dev in self.signature])
        self.free.extend(range(first + rows - 1, first - 1, -1))
        return rows * self.entry_bytes


class FrozenFeatureCache:
    """`cache(encode, images)` equals `encode(images)` for a frozen `encode` whose outputs for one
    image do not depend on the other images of the batch: images seen before (same bytes, same
    autocast state) take their stored outputs, the others go through `encode` as one sub-batch.
    At most `max_bytes` of slabs are allocated; then the least recently used entry of the same
    image size and precision gives its slot. Copies share the cache."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.allocated = 0  # bytes of slabs
        self.hits = 0
        self.misses = 0
        self._banks: Dict[Signature, _Bank] = {}
        self._strides: Dict[Tuple[int, ...], Tuple[int, ...]] = {}  # the encoder's output strides, by (output, shape)

    def __deepcopy__(self, memo: Dict[int, object]) -> "FrozenFeatureCache":
        return self

    def __len__(self) -> int:
        return sum(len(b.entries) for b in self._banks.values())

    @property
    def bytes(self) -> int:
        """Bytes of the entries held."""
        return sum(len(b.entries) * b.entry_bytes for b in self._banks.values())

    @staticmethod
    def key(image: Tensor) -> bytes:
        """A digest of the image's shape, dtype, bytes and the autocast state it is encoded under."""
        dev = image.device.type
        amp = str(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else "fp32"
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{tuple(image.shape)}|{image.dtype}|{amp}".encode())
        h.update(image.detach().contiguous().cpu().numpy().tobytes())
        return h.digest()

    def _find(self, key: bytes) -> Optional[List[Tensor]]:
        for bank in self._banks.values():
            slot = bank.entries.get(key)
            if slot is not None:
                bank.entries.move_to_end(key)
                return bank.rows(slot)
        return None

    def _slot(self, bank: _Bank) -> Optional[int]:
        if not bank.free:
            room = (self.max_bytes - self.allocated) // bank.entry_bytes
            if room > 0:
                self.allocated += bank.grow(min(room, bank.rows_per_chunk))
            elif bank.entries:
                _, slot = bank.entries.popitem(last=False)
                return slot
            else:
                return None
        return bank.free.pop()

    def _put(self, key: bytes, outputs: List[Tensor]) -> None:
        """Stores one image's outputs (one tensor per encoder output)."""
        signature = tuple((tuple(t.shape), t.dtype, t.device) for t in outputs)
        bank = self._banks.get(signature)
        if bank is None:
            bank = self._banks[signature] = _Bank(signature)
        if key in bank.entries:
            return
        slot = self._slot(bank)
        if slot is None:
            return
        for row, t in zip(bank.rows(slot), outputs):
            row.copy_(t)
        bank.entries[key] = slot

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
        found = {k: rows for k in dict.fromkeys(keys) if (rows := self._find(k)) is not None}
        miss = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if len(miss) == len(keys):
            taps, dense = encode(images)
            self._remember_strides((taps, dense))
            for i, k in enumerate(keys):
                self._put(k, [*(t[i] for t in taps), dense[i]])
            return taps, dense
        new: Dict[bytes, List[Tensor]] = {}
        if miss:
            taps, dense = encode(images[miss])
            self._remember_strides((taps, dense))
            new = {keys[i]: [*(t[j] for t in taps), dense[j]] for j, i in enumerate(miss)}
        rows = [found.get(k) or new[k] for k in keys]
        levels = len(rows[0]) - 1
        out = ([self._assemble(level, [r[level] for r in rows]) for level in range(levels)],
               self._assemble(levels, [r[levels] for r in rows]))
        for k, outputs in new.items():  # after assembling: a new entry may take the slot of a hit
            self._put(k, outputs)
        return out
