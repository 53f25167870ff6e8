"""engine.kvcache: a RoomyLayer holds what transformers' DynamicLayer holds, step by step."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from prefixlab.engine.kvcache import RoomyLayer, make_room


def _kv(B: int, S: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, 2, S, 4, generator=g), torch.randn(B, 2, S, 4, generator=g)


def test_a_roomy_layer_matches_a_dynamic_layer_through_every_operation():
    g = torch.Generator().manual_seed(0)
    k, v = _kv(3, 5, g)
    plain = DynamicLayer()
    plain.update(k, v)
    roomy = RoomyLayer(k, v, room=2)  # too little room: the third update must grow it

    def same() -> None:
        assert torch.equal(roomy.keys, plain.keys) and torch.equal(roomy.values, plain.values)
        assert roomy.get_seq_length() == plain.get_seq_length()

    same()
    for step in range(4):
        k, v = _kv(plain.keys.shape[0], 1 + step % 2, g)
        assert all(torch.equal(a, b) for a, b in zip(roomy.update(k, v), plain.update(k, v),
                                                     strict=True))
        same()
    plain.batch_repeat_interleave(2), roomy.batch_repeat_interleave(2)
    same()
    index = torch.tensor([5, 0, 0, 3, 1, 2])  # a beam step: rows picked, copied and dropped
    plain.reorder_cache(index), roomy.reorder_cache(index)
    same()
    keep = torch.tensor([1, 4])  # finished rows leave
    plain.batch_select_indices(keep), roomy.batch_select_indices(keep)
    same()
    k, v = _kv(2, 1, g)
    roomy.update(k, v), plain.update(k, v)
    same()
    plain.crop(-2), roomy.crop(-2)
    same()


def test_make_room_converts_filled_plain_layers_only():
    g = torch.Generator().manual_seed(1)
    cache = DynamicCache([_kv(2, 3, g), _kv(2, 3, g)])
    keys = [layer.keys.clone() for layer in cache.layers]
    make_room(cache, 8)
    assert all(isinstance(layer, RoomyLayer) for layer in cache.layers)
    assert all(torch.equal(a.keys, b) for a, b in zip(cache.layers, keys, strict=True))
    assert cache.get_seq_length() == 3
    assert cache.layers[0].capacity == 3 + 8  # room for the 8 tokens to come
