"""Figures build from the interpret modules' results: expected traces, points and plain lists."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from prefixlab.figures import plots
from prefixlab.interpret.attention import AttentionMass
from prefixlab.interpret.maps import LayersMap, Movement, PCAMap, PrefixComparison
from prefixlab.interpret.nearest import NearestTokens
from prefixlab.interpret.values import ValueReadout

L, P, K, N = 3, 4, 5, 30
rng = np.random.default_rng(0)


def _plain(fig: go.Figure) -> None:
    """Every data array reached plotly as a list (stored as a tuple), never as numpy."""
    for trace in fig.data:
        for name in ("x", "y", "z"):
            value = getattr(trace, name, None)
            assert value is None or isinstance(value, tuple), (trace.type, name, type(value))


def _nearest() -> NearestTokens:
    ids = rng.integers(0, 50, size=(L, 2, P, K))
    scores = np.sort(rng.uniform(0, 1, size=(L, 2, P, K)), axis=-1)[..., ::-1]
    return NearestTokens(ids, scores, np.full((L, 2, P), 0.3), np.full((L, 2, P), 0.05),
                         np.full((L, P), 40), {i: f" tok{i}" for i in range(50)})


def _pca(names=("trained", "step 0")) -> PCAMap:
    return PCAMap(1, "key", [f"t{i}" for i in range(N)], list(range(N)), rng.normal(size=(N, 3)),
                  {n: rng.normal(size=(P, 3)) for n in names}, np.array([0.4, 0.2, 0.1]))


@pytest.mark.parametrize("dims", [2, 3])
def test_pca_figure_puts_labeled_prefix_points_on_the_cloud(dims):
    fig = plots.pca_figure(_pca(), dims)
    assert len(fig.data) == 3  # the cloud, then one trace per prefix
    cloud, first = fig.data[0], fig.data[1]
    assert len(cloud.x) == N and list(cloud.hovertext[:2]) == ["t0", "t1"]
    assert list(first.text) == [f"P{p}" for p in range(P)] and first.name == "trained"
    assert (cloud.type, first.type) == (("scatter",) * 2 if dims == 2 else ("scatter3d",) * 2)
    _plain(fig)
    with pytest.raises(ValueError, match="dims"):
        plots.pca_figure(_pca(), 4)


@pytest.mark.parametrize("dims", [2, 3])
def test_pca_figure_marks_the_runs_own_words_in_the_cloud(dims):
    words = {"label words": [3, 7], "init text": [7, 12, 999], "data words": [20, 21]}
    fig = plots.pca_figure(_pca(), dims, words)
    names = [t.name for t in fig.data]
    # the cloud, one trace per group, then the prefixes on top
    assert names == ["real tokens", "label words", "init text", "data words", "trained", "step 0"]
    label, init, data = fig.data[1:4]
    assert len(label.x) == 2 and list(label.hovertext) == ["label words: t3", "label words: t7"]
    # 7 is a label word already and 999 is not in the cloud: the init group keeps only 12
    assert list(init.hovertext) == ["init text: t12"]
    assert list(data.hovertext) == ["data words: t20", "data words: t21"]
    assert len({(t.marker.color, t.marker.symbol) for t in (label, init, data)}) == 3
    assert all(t.showlegend is not False for t in (label, init, data))
    _plain(fig)


def test_pca_figure_puts_each_word_on_its_own_cloud_point():
    result = _pca()
    fig = plots.pca_figure(result, 2, {"label words": [5]})
    assert (fig.data[1].x[0], fig.data[1].y[0]) == tuple(result.cloud[5, :2])
    assert len(plots.pca_figure(result, 2, {"label words": [999]}).data) == 3  # none shown


def _layers(M=20) -> LayersMap:
    return LayersMap("value", rng.normal(size=(L, P, 2)), np.ones((L, 2)),
                     rng.normal(size=(L, M, 2)), [f"t{i}" for i in range(M)])


def test_layers_figure_has_a_panel_per_layer():
    result = _layers()
    fig = plots.layers_figure(result, columns=2)
    cloud, prefix = fig.data  # two traces on one pair of axes: quick for the browser to draw
    assert len(cloud.x) == 20 * L and len(prefix.x) == P * L
    assert prefix.hovertext[P + 2] == "P2 · layer 1" and cloud.hovertext[20] == "t0 · layer 1"
    assert [a.text for a in fig.layout.annotations] == [f"layer {i}" for i in range(L)]
    boxes = fig.layout.shapes
    assert len(boxes) == L
    for layer in range(L):  # each layer's points sit inside its own cell, none outside
        box = boxes[layer]
        c, p = slice(20 * layer, 20 * (layer + 1)), slice(P * layer, P * (layer + 1))
        xs, ys = cloud.x[c] + prefix.x[p], cloud.y[c] + prefix.y[p]
        assert box.x0 < min(xs) and max(xs) < box.x1 and box.y0 < min(ys) and max(ys) < box.y1
    # a panel keeps its PCA's shape: distances between two prefix points scale alike on x, y
    a, b = result.coords[0, 0], result.coords[0, 1]
    pa, pb = np.array([prefix.x[0], prefix.y[0]]), np.array([prefix.x[1], prefix.y[1]])
    ratio = (pb - pa) / (b - a)
    assert ratio[0] == pytest.approx(ratio[1])
    _plain(fig)


def test_nearest_tokens_figure_and_table():
    result = _nearest()
    fig = plots.nearest_tokens_figure(result, "value")
    assert len(fig.data) == 1
    heat = fig.data[0]
    assert np.array(heat.z).shape == (L, P)
    np.testing.assert_allclose(heat.z, result.margin[:, 1])
    assert heat.text[0][0] == plots.show_token(result.labels[int(result.token_ids[0, 1, 0, 0])])
    _plain(fig)
    headers, rows = plots.nearest_tokens_table(result, 2, "key")
    assert len(headers) == K + 3 and len(rows) == P
    assert rows[0][0] == "P0" and rows[0][1].startswith("␣tok")


def test_value_readout_table():
    readout = ValueReadout(rng.integers(0, 9, size=(L, P, K)), rng.normal(size=(L, P, K)),
                           {i: f"w{i}\n" for i in range(9)})
    headers, rows = plots.value_readout_table(readout, 0)
    assert len(headers) == K + 1 and len(rows) == P and rows[1][1].endswith(")")
    assert "⏎" in rows[0][1]


def test_movement_figures():
    S = 5
    movement = Movement([0, 10, 20, 30, 40], rng.normal(size=(S, 2)), np.array([0.8, 0.1]),
                        np.abs(rng.normal(size=(S, L, 2))), True)
    trajectory = plots.trajectory_figure(movement)
    assert len(trajectory.data) == 1 and list(trajectory.data[0].text) == ["0", "10", "20", "30",
                                                                           "40"]
    distance = plots.distance_figure(movement)
    assert len(distance.data) == 2 * L  # a line per layer, keys and values
    assert all(len(t.y) == S for t in distance.data)
    _plain(trajectory)
    _plain(distance)


def test_two_snapshots_are_drawn_on_one_axis_with_plain_numbers():
    """Two points span one direction: "PC2 0%" and SI ticks such as "-30f" read as nonsense."""
    movement = Movement([0, 4], np.array([[-1.0, 3e-14], [1.0, -3e-14]]), np.array([1.0, 0.0]),
                        np.abs(rng.normal(size=(2, L, 2))), True)
    fig = plots.trajectory_figure(movement)
    assert list(fig.data[0].y) == [0.0, 0.0] and fig.layout.yaxis.visible is False
    assert "PC2" not in fig.to_json() and "one direction" in fig.layout.title.text
    assert fig.layout.xaxis.exponentformat == "power"
    _plain(fig)


def test_attention_and_similarity_heatmaps():
    H = 4
    mass = AttentionMass(["trained", "step 0"], ["a", "b"], rng.uniform(size=(2, L, H)))
    fig = plots.attention_heatmap(mass)
    assert len(fig.data) == 3 and np.array(fig.data[0].z).shape == (L, H)  # two + difference
    np.testing.assert_allclose(fig.data[2].z, mass.mass[0] - mass.mass[1])
    assert len(plots.attention_heatmap(AttentionMass(["x"], ["a"], mass.mass[:1])).data) == 1
    _plain(fig)
    sim = rng.uniform(-1, 1, size=(L, 3, 3))
    comparison = PrefixComparison(["a", "b", "c"], sim)
    one = plots.similarity_heatmap(comparison, layer=1)
    np.testing.assert_allclose(one.data[0].z, sim[1])
    mean = plots.similarity_heatmap(comparison)
    np.testing.assert_allclose(mean.data[0].z, sim.mean(axis=0))
    assert len(one.data) == len(mean.data) == 1
    _plain(mean)


def test_inspection_page_is_standalone():
    movement = Movement([0, 5], np.zeros((2, 2)), np.zeros(2), np.zeros((2, L, 2)), True)
    page = plots.inspection_html(
        title="Inside <run>", model="tiny", nearest=_nearest(),
        readout=ValueReadout(np.zeros((L, P, K), dtype=int), np.zeros((L, P, K)), {0: "<b>"}),
        maps={"key": _pca()}, layers={"key": _layers()},
        movement=movement, attention=None,
    )
    assert page.count("Plotly.newPlot") == 6  # 2 nearest, 1 map, 1 layers, 2 movement
    assert "<td>&lt;b&gt; (0.0)</td>" in page and "<td><b>" not in page  # tokens escaped
    assert "<h1>Inside &lt;run&gt;</h1>" in page
    assert "No texts were available" in page
