"""Where prefixes sit as a whole: PCA maps among real tokens, movement over training, similarity.

Arrays and dataclasses only; figures are in figures/plots.py. Keys are put in the key frame
(see readouts.py) so that positions share one map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prefixlab.engine.models import LoadedModel

# the interpret modules share readouts.py's input checks
from prefixlab.interpret.frame import (
    InterpretError,
    _check_kv,
    _kind_index,
    _named,
    _unit,
    unrotate_keys,
)
from prefixlab.interpret.nearest import ReferenceBank

# --- PCA maps ---------------------------------------------------------------------------------


def _layer_vectors(loaded: LoadedModel, kv: torch.Tensor, layer: int, kind: str) -> np.ndarray:
    """(P, H_kv*D) vectors of one layer and kind, keys in the key frame."""
    i = _kind_index(kind)
    x = kv[layer, i].detach().float().cpu()  # (H, P, D)
    if i == 0:
        x = unrotate_keys(loaded, x, torch.arange(x.shape[1]))
    return x.transpose(0, 1).flatten(1).numpy()  # (P, H*D)


@dataclass
class _PCA:
    """A fitted PCA: what sklearn's PCA gives the maps (mean, components, variance ratios)."""

    mean: np.ndarray  # (F,)
    components: np.ndarray  # (k, F), largest variance first
    explained_variance_ratio_: np.ndarray  # (k,)

    @property
    def n_components_(self) -> int:
        return self.components.shape[0]

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


def _signed(components: np.ndarray) -> np.ndarray:
    """sklearn's sign convention: each component's largest-magnitude loading is positive."""
    idx = np.abs(components).argmax(-1)[..., None]
    sign = np.sign(np.take_along_axis(components, idx, -1))
    return components * np.where(sign == 0, 1.0, sign)


def _fit_pcas(x: torch.Tensor, dims: int) -> list[_PCA]:
    """One PCA per batch item of x (B, n, F), n >= F, fitted together through the (F, F)
    covariances: one batched matmul and one batched eigh for every layer of a map. The
    covariance is summed in float32 (a map, not a measurement), the eigh runs in float64.
    Fitting layer by layer through sklearn spends most of its time starting threads for
    each small call; batched, that cost is paid once."""
    x = x.float()
    B, n, F = x.shape
    mean = x.mean(1, keepdim=True)  # (B, 1, F)
    xc = x - mean
    cov = (xc.transpose(1, 2) @ xc).double() / max(n - 1, 1)  # (B, F, F)
    var, vecs = torch.linalg.eigh(cov)  # ascending
    var, vecs = var.flip(-1).clamp_min(0).numpy(), vecs.flip(-1).numpy()
    k = min(dims, n, F)
    total = var.sum(-1, keepdims=True)  # (B, 1)
    ratio = np.divide(var[:, :k], total, out=np.zeros((B, k)), where=total > 0)
    components = _signed(vecs[:, :, :k].transpose(0, 2, 1))  # (B, k, F)
    return [_PCA(mean[b, 0].double().numpy(), components[b], ratio[b]) for b in range(B)]


def _fit_pca(x: np.ndarray, dims: int) -> _PCA:
    # Exact either way: through the (F, F) covariance when samples outnumber features (a
    # token cloud), else a thin SVD (a few snapshots of a large prefix).
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] <= x.shape[0]:
        return _fit_pcas(torch.from_numpy(x)[None], dims)[0]
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2 / max(len(x) - 1, 1)
    k = min(dims, *x.shape)
    total = var.sum()
    ratio = var[:k] / total if total > 0 else np.zeros(k)
    return _PCA(mean, _signed(vt[:k]), ratio)


def _pad(coords: np.ndarray, dims: int) -> np.ndarray:
    if coords.shape[1] == dims:
        return coords
    return np.pad(coords, ((0, 0), (0, dims - coords.shape[1])))


@dataclass
class PCAMap:
    """One layer's prefix vectors and reference cloud in the same PCA coordinates."""

    layer: int
    kind: str
    tokens: list[str]  # one per cloud point
    token_ids: list[int]
    cloud: np.ndarray  # (N, dims)
    prefixes: dict[str, np.ndarray]  # name -> (P, dims); points are P0..P{P-1}
    explained_variance: np.ndarray  # (dims,) ratio of the joint data's variance


def pca_map(
    loaded: LoadedModel,
    bank: ReferenceBank,
    prefixes: Mapping[str, torch.Tensor] | torch.Tensor,
    layer: int,
    kind: str = "key",
    dims: int = 3,
) -> PCAMap:
    """PCA fitted jointly on the layer's reference cloud and every prefix's P vectors.

    A vector is the concatenation over KV heads (H_kv*D); keys are in the key frame so that
    positions share one map. Several prefixes (e.g. runs to compare) share the same fit.
    """
    named = _named(prefixes)
    for kv in named.values():
        _check_kv(loaded, kv)
    if not 0 <= layer < loaded.shape.num_layers:
        raise InterpretError(f"layer must be 0..{loaded.shape.num_layers - 1}, got {layer}")
    cloud = bank.vectors(kind)[layer].numpy()  # (N, H*D)
    points = {name: _layer_vectors(loaded, kv, layer, kind) for name, kv in named.items()}
    pca = _fit_pca(np.vstack([cloud, *points.values()]), dims)
    ratio = np.zeros(dims)
    ratio[: pca.n_components_] = pca.explained_variance_ratio_
    return PCAMap(
        layer, kind, list(bank.tokens), list(bank.token_ids), _pad(pca.transform(cloud), dims),
        {name: _pad(pca.transform(x), dims) for name, x in points.items()}, ratio,
    )


def layer_pca_maps(loaded: LoadedModel, bank: ReferenceBank, kv: torch.Tensor,
                   kind: str = "key", dims: int = 3) -> list[PCAMap]:
    """pca_map of every layer for one prefix (named "prefix"), fitted in one batch: what the
    Inspect tab makes when a run opens, so a change of layer or of 2-D/3-D only draws."""
    _check_kv(loaded, kv)
    clouds = bank.vectors(kind)  # (L, N, H*D)
    L = kv.shape[0]
    points = torch.stack([torch.from_numpy(_layer_vectors(loaded, kv, layer, kind))
                          for layer in range(L)])  # (L, P, H*D)
    if clouds.shape[-1] > clouds.shape[1] + points.shape[1]:  # fewer samples than features
        return [pca_map(loaded, bank, kv, layer, kind, dims) for layer in range(L)]
    fits = _fit_pcas(torch.cat([clouds.float(), points], 1), dims)
    maps = []
    for layer, pca in enumerate(fits):
        ratio = np.zeros(dims)
        ratio[: pca.n_components_] = pca.explained_variance_ratio_
        maps.append(PCAMap(
            layer, kind, list(bank.tokens), list(bank.token_ids),
            _pad(pca.transform(clouds[layer].numpy()), dims),
            {"prefix": _pad(pca.transform(points[layer].numpy()), dims)}, ratio))
    return maps


@dataclass
class LayersMap:
    """Every layer's prefix positions in that layer's own 2-D PCA, in units of the cloud."""

    kind: str
    coords: np.ndarray  # (L, P, 2): each axis divided by the reference cloud's std on it
    explained_variance: np.ndarray  # (L, 2)
    cloud: np.ndarray  # (L, M, 2): an even sample of the reference cloud, same units
    tokens: list[str]  # (M,) the sampled tokens


def layers_map(loaded: LoadedModel, bank: ReferenceBank, kv: torch.Tensor,
               kind: str = "key", cloud_points: int = 80,
               maps: Sequence[PCAMap] | None = None) -> LayersMap:
    """One point per layer and position, fitted per layer.

    Layers have unrelated bases (each its own W_k, W_v), so one PCA across layers would mostly
    separate layers from each other, and lines joining a position across layers would join
    unrelated coordinates. Each layer is fitted on its own cloud plus the prefix; coordinates
    are divided by the cloud's spread on each axis, so "2" means two standard deviations of
    real tokens at every layer; each axis is signed so the prefix's mean is positive (PCA
    signs are arbitrary). `cloud_points` tokens of the cloud come along for context (enough
    to show the cloud's shape in a small panel; more make a many-panel figure slow to draw).
    maps: this prefix's layer_pca_maps (2 or more dimensions) when already made; their first
    two axes are the same fit.
    """
    _check_kv(loaded, kv)
    L, P = kv.shape[0], kv.shape[3]
    N = len(bank.token_ids)
    if maps is None:
        maps = layer_pca_maps(loaded, bank, kv, kind, dims=2)
    if len(maps) != L or any(m.kind != kind or m.cloud.shape[1] < 2 for m in maps):
        raise InterpretError(f"layers_map needs one {kind} map of 2+ dimensions per layer")
    sample = np.unique(np.linspace(0, N - 1, min(cloud_points, N)).round().astype(int))
    coords = np.zeros((L, P, 2))
    clouds = np.zeros((L, len(sample), 2))
    ratios = np.zeros((L, 2))
    for layer, m in enumerate(maps):
        cloud_xy = m.cloud[:, :2]
        spread = cloud_xy.std(axis=0)
        spread = np.where(spread > 0, spread, 1.0)
        xy = next(iter(m.prefixes.values()))[:, :2] / spread
        sign = np.where(xy.mean(axis=0) < 0, -1.0, 1.0)
        coords[layer] = xy * sign
        clouds[layer] = cloud_xy[sample] / spread * sign
        ratios[layer] = m.explained_variance[:2]
    return LayersMap(kind, coords, ratios, clouds, [bank.tokens[i] for i in sample])


# --- movement during training -----------------------------------------------------------------


@dataclass
class Movement:
    """How the prefix moved over training steps."""

    steps: list[int]
    trajectory: np.ndarray  # (S, 2): PCA of the whole flattened prefix per snapshot
    explained_variance: np.ndarray  # (2,)
    distance: np.ndarray  # (S, L, 2): |kv_s - kv_0| per layer and kind, over |kv_0| if relative
    relative: bool  # False when a layer started at zero: distances are then absolute


def prefix_movement(snapshots: Sequence[tuple[int, torch.Tensor]]) -> Movement:
    """Trajectory and per-layer distance from the first snapshot (the initialization)."""
    if not snapshots:
        raise InterpretError("no snapshots to follow: the run saved none")
    steps = [int(s) for s, _ in snapshots]
    # on CPU, detached: a live prefix's key_values() may be on CUDA and in the graph
    stack = torch.stack([kv.detach().float().cpu() for _, kv in snapshots])  # (S, L, 2, H, P, D)
    shapes = {tuple(kv.shape) for _, kv in snapshots}
    if len(shapes) > 1:
        raise InterpretError(f"snapshots have different shapes: {sorted(shapes)}")
    flat = stack.flatten(1).numpy()  # (S, L*2*H*P*D)
    trajectory = np.zeros((len(steps), 2))
    ratio = np.zeros(2)
    if len(steps) > 1:
        pca = _fit_pca(flat, 2)
        trajectory = _pad(pca.transform(flat), 2)
        ratio[: pca.n_components_] = pca.explained_variance_ratio_
    per_layer = stack.flatten(3)  # (S, L, 2, H*P*D)
    moved = (per_layer - per_layer[:1]).norm(dim=-1)  # (S, L, 2)
    start = per_layer[0].norm(dim=-1)  # (L, 2)
    relative = bool((start > 0).all())
    distance = moved / start if relative else moved
    return Movement(steps, trajectory, ratio, distance.numpy(), relative)


# --- comparing prefixes -----------------------------------------------------------------------


@dataclass
class PrefixComparison:
    names: list[str]
    similarity: np.ndarray  # (L, R, R) cosine of each layer's flattened key/values


def compare_prefixes(prefixes: Mapping[str, torch.Tensor]) -> PrefixComparison:
    """Cosine similarity between prefixes per layer (same model and prefix length)."""
    named = _named(prefixes)
    shapes = {name: tuple(kv.shape) for name, kv in named.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n}: {s}" for n, s in shapes.items())
        raise InterpretError(f"prefixes must share one shape to be compared; got {listed}")
    stack = torch.stack([kv.detach().float().cpu() for kv in named.values()])  # (R, L, 2, H, P, D)
    per_layer = _unit(stack.reshape(*stack.shape[:2], -1).transpose(0, 1))  # (L, R, 2*H*P*D)
    return PrefixComparison(list(named), (per_layer @ per_layer.transpose(1, 2)).numpy())


__all__ = [
    "LayersMap", "Movement", "PCAMap", "PrefixComparison", "compare_prefixes", "layer_pca_maps",
    "layers_map", "pca_map", "prefix_movement",
]
