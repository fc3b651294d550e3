"""Tensor-flow diagrams for the lessons: boxes for inputs, weights, per-step results and cached tensors, arrows
between them.

``draw_flow`` draws one diagram on a matplotlib axes; ``legend_handles`` gives the coloured patches of a legend
that a lesson places itself (across a whole figure, or with its own wording).  ``COLORS`` is the palette the
lessons share: one fill per kind of box.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from matplotlib.patches import FancyBboxPatch, Patch

# kind of box -> fill; the kinds a lesson draws with the shared palette
COLORS: dict[str, str] = {
    "input": "white",
    "weight": "#e6e6e6",
    "computed per step": "#cfe2f3",
    "cached": "#ffd966",
    "recomputed from the cache each step": "#f4cccc",
}


def legend_handles(
    kinds: Iterable[str] | None = None,
    *,
    colors: Mapping[str, str] = COLORS,
    labels: Mapping[str, str] | None = None,
) -> list[Patch]:
    """One filled patch per kind in ``kinds`` (default: every kind of ``colors``), labelled ``labels[kind]`` or the
    kind itself: the ``handles=`` of ``ax.legend`` or ``fig.legend``."""
    labels = labels or {}
    return [
        Patch(facecolor=colors[kind], edgecolor="black", label=labels.get(kind, kind))
        for kind in (colors if kinds is None else kinds)
    ]


def draw_flow(
    ax,
    boxes: Mapping[str, Sequence],
    arrows: Iterable[tuple[str, str]],
    *,
    colors: Mapping[str, str] = COLORS,
    width: float = 3.0,
    height: float = 0.7,
    pad: float = 0.04,
    fontsize: float = 8,
    highlight: str = "cached",
    route: str = "centres",
    arrowstyle: str = "-|>",
    legend: str | None = None,
    labels: Mapping[str, str] | None = None,
    fit: bool = True,
) -> None:
    """Draw a tensor-flow diagram on ``ax``: one rounded box per tensor, one arrow per dependency.

    ``boxes``: name -> ``(x, y, label, kind)``, or ``(x, y, w, label, kind)`` for a box of its own width ``w``; the
        box is centred at (x, y) in data units, ``width`` (or ``w``) wide and ``height`` high, filled with
        ``colors[kind]``, its text ``label`` (matplotlib mathtext allowed) in ``fontsize`` points.  Boxes of kind
        ``highlight`` (the cached tensors) get a thick outline.
    ``arrows``: ``(from, to)`` pairs of box names.  ``route="centres"`` draws each on the line between the two
        centres, from the edge of one box to the edge of the other; ``route="sides"`` leaves a box by its right
        side and enters the next by its left (or by top and bottom where the two stand more above each other
        than beside).  ``arrowstyle``: matplotlib's, e.g. ``"-|>"`` (filled head) or ``"->"`` (open).
    ``pad``: the rounding of the boxes' corners, in data units.
    ``legend``: a ``loc`` such as ``"lower right"`` puts one row of the kinds the boxes use (in ``colors``' order,
        labelled ``labels[kind]`` or the kind) in the axes; None draws none (see ``legend_handles``).
    ``fit``: set the limits to the boxes plus a margin (room below for the legend) and equal aspect; False
        leaves limits and aspect to the caller.  Ticks are always removed.
    """
    if route not in ("centres", "sides"):
        raise ValueError(f"route must be 'centres' or 'sides', got {route!r}")
    # name -> (x, y, w, label, kind)
    placed = {name: box if len(box) == 5 else (box[0], box[1], width, box[2], box[3]) for name, box in boxes.items()}
    for x, y, w, label, kind in placed.values():
        outline = 2.2 if kind == highlight else 0.8
        corner = (x - w / 2, y - height / 2)
        style = f"round,pad={pad}"
        ax.add_patch(FancyBboxPatch(corner, w, height, style, facecolor=colors[kind], edgecolor="black", lw=outline))
        ax.text(x, y, label, ha="center", va="center", fontsize=fontsize)

    for start, end in arrows:
        (x0, y0, w0, *_), (x1, y1, w1, *_) = placed[start], placed[end]
        dx, dy = x1 - x0, y1 - y0
        if route == "centres":
            # leave and enter each box at its edge (the rounded corner's pad included), on the line between centres
            t0, t1 = (min(w / 2 / max(abs(dx), 1e-9), (height / 2 + 1.5 * pad) / max(abs(dy), 1e-9)) for w in (w0, w1))
            tail, head = (x0 + t0 * dx, y0 + t0 * dy), (x1 - t1 * dx, y1 - t1 * dy)
        elif abs(dx) > abs(dy):  # side to side, left to right
            tail, head = (x0 + w0 / 2, y0), (x1 - w1 / 2, y1)
        else:  # top or bottom
            sign = 1 if dy > 0 else -1
            tail, head = (x0, y0 + sign * height / 2), (x1, y1 - sign * height / 2)
        ax.annotate("", xy=head, xytext=tail, arrowprops=dict(arrowstyle=arrowstyle, lw=1))

    if legend is not None:
        used = [kind for kind in colors if any(box[4] == kind for box in placed.values())]
        ax.legend(handles=legend_handles(used, colors=colors, labels=labels), loc=legend, fontsize=7, ncol=len(used))
    ax.set(xticks=[], yticks=[])
    if fit:
        left = min(x - w / 2 for x, _, w, *_ in placed.values())
        right = max(x + w / 2 for x, _, w, *_ in placed.values())
        ys = [y for _, y, *_ in placed.values()]
        below = 1.3 if legend is not None else 0.6  # room for the legend under the lowest box
        ax.set(xlim=(left - 0.3, right + 0.3), ylim=(min(ys) - below, max(ys) + 0.6), aspect="equal")
