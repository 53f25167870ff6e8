"""A key/value cache layer that writes each new token in place, for decoding.

transformers' `DynamicLayer` appends a step's keys and values with `torch.cat`, which copies
the whole cache (prefix + prompt + everything generated so far) at every layer and every
step. `RoomyLayer` holds its keys and values in buffers with room for the tokens still to come
and hands the model views of the filled part, so a step writes one position per row instead.
Beam reordering and dropping finished rows select rows of the buffers, as `DynamicLayer` does
of its tensors. The model reads the same numbers either way (decode tests compare outputs).

Imported where a cache is built: importing transformers is slow, and `prefixlab.engine.decode` loads
with every run config.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    """A `DynamicLayer` over buffers (B, H, S + room, D); `keys`/`values` are views of the
    first S positions (what the model and `get_seq_length` read)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        B, H, S, D = keys.shape
        self.device = keys.device
        self._k = keys.new_empty(B, H, S + room, D)  # (B, H, S+room, D)
        self._v = values.new_empty(B, H, S + room, D)
        self._k[:, :, :S] = keys
        self._v[:, :, :S] = values
        self._length = S
        self.is_initialized = True
        self._views()

    @property
    def capacity(self) -> int:
        """Positions the buffers hold, filled or not."""
        return self._k.shape[-2]

    def _views(self) -> None:
        self.keys = self._k[:, :, : self._length]  # (B, H, S, D), strided over the room
        self.values = self._v[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        if end > self._k.shape[-2]:  # out of room (more steps than planned): double it
            grow = max(end, 2 * self._k.shape[-2]) - self._k.shape[-2]
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow,
                                                            self._k.shape[3])], -2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow,
                                                            self._v.shape[3])], -2)
        self._k[:, :, self._length: end] = key_states
        self._v[:, :, self._length: end] = value_states
        self._length = end
        self._views()
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._k = self._k.index_select(0, beam_idx.to(self._k.device))
        self._v = self._v.index_select(0, beam_idx.to(self._v.device))
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens, got {tokens_to_remove}")
        self._length = max(0, self._length + tokens_to_remove)
        self._views()

    def reset(self) -> None:
        self._length = 0
        self._views()


def make_room(cache: DynamicCache, room: int) -> DynamicCache:
    """Turn the filled plain layers of `cache` into `RoomyLayer`s with `room` free positions;
    other layer kinds (sliding windows, linear attention) stay as they are."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[i] = RoomyLayer(layer.keys, layer.values, room)
    return cache
