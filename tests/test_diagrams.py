"""draw_flow draws what it is given: a box per tensor, an arrow per dependency, a legend of the kinds used."""

import matplotlib
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from matplotlib.text import Annotation

from mla_ref.diagrams import COLORS, draw_flow, legend_handles


def agg_axes():
    return Figure(figsize=(4, 2)).add_subplot()


def render(ax):
    FigureCanvasAgg(ax.figure).draw()  # the diagram draws without error on the Agg canvas


BOXES = {"x": (0.0, 0.0, "$x$: (1, d)", "input"), "c": (4.0, 0.0, "cache $c$: (T, $d_c$)", "cached")}


@pytest.mark.parametrize("route", ["centres", "sides"])
def test_two_boxes_an_arrow_and_a_legend(route):
    ax = agg_axes()
    draw_flow(ax, BOXES, [("x", "c")], route=route, legend="lower right")
    patches = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
    assert len(patches) == 2
    assert [p.get_linewidth() for p in patches] == [0.8, 2.2]  # the cached box is outlined
    (arrow,) = [t for t in ax.texts if isinstance(t, Annotation)]
    assert arrow.xyann[0] == pytest.approx(1.5) and arrow.xy[0] == pytest.approx(2.5)  # edge to edge
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["input", "cached"]  # only the kinds used
    assert ax.get_xticks().size == 0 and ax.get_xlim() == pytest.approx((-1.8, 5.8))
    render(ax)


def test_boxes_of_their_own_width_and_no_legend():
    ax = agg_axes()
    boxes = {"a": (0.0, 0.0, 1.0, "a", "weight"), "b": (0.0, 3.0, 2.0, "b", "computed per step")}
    draw_flow(ax, boxes, [("a", "b")], route="sides", fit=False)
    assert [p.get_width() for p in ax.patches] == [1.0, 2.0]
    (arrow,) = ax.texts[2:]
    assert arrow.xyann == pytest.approx((0.0, 0.35)) and arrow.xy == pytest.approx((0.0, 2.65))  # bottom to top
    assert ax.get_legend() is None
    render(ax)


def test_legend_handles_label_and_fill():
    handles = legend_handles(["cached"], labels={"cached": "kept between steps"})
    assert [h.get_label() for h in handles] == ["kept between steps"]
    assert matplotlib.colors.to_hex(handles[0].get_facecolor()) == COLORS["cached"]
    with pytest.raises(ValueError, match="route"):
        draw_flow(agg_axes(), BOXES, [], route="straight")
