"""Figure style: seaborn paper theme, one fixed colour per arm, optional tueplots bundle.

Fonts are always forced to an installed family (DejaVu) and LaTeX is never used, so figures
build on a bare Linux box; a tueplots bundle contributes sizes (column width, font sizes).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import matplotlib as mpl
import seaborn as sns

# Fixed colours (seaborn "colorblind" palette entries) so an arm looks the same in every figure.
ARM_PALETTE: dict[str, str] = {
    "none": "#0173b2",  # blue
    "bn": "#d55e00",  # vermillion
    "noisy_bn": "#029e73",  # green
    "ln": "#cc78bc",  # pink
    "gn": "#ca9161",  # brown
    "lp": "#de8f05",  # orange
    # the lp normalizer's spellings with their exponent (icsk.models.norms), often compared together
    "lp1": "#56b4e9",  # sky blue
    "lp2": "#de8f05",  # orange, as lp (p = 2 by default)
    "lpinf": "#949494",  # grey
    "lp_inf": "#949494",
}
_SPARE_COLOURS = ["#fbafe4", "#ece133", "#000000", "#a6761d", "#7570b3"]
ARM_ORDER = ["none", "bn", "noisy_bn", "ln", "gn", "lp", "lp1", "lp2", "lpinf", "lp_inf"]
ARM_LABELS: dict[str, str] = {
    "none": "no norm",
    "bn": "BN",
    "noisy_bn": "noisy BN",
    "ln": "LayerNorm",
    "gn": "GroupNorm",
    "lp": "Lp norm",
    "lp1": "L1 norm",
    "lp2": "L2 norm",
    "lpinf": "L∞ norm",
    "lp_inf": "L∞ norm",
}
ARM_TITLES: dict[str, str] = {
    "none": "without BN",
    "bn": "with BN",
    "noisy_bn": "with noisy BN",
    "ln": "with LayerNorm",
    "gn": "with GroupNorm",
    "lp": "with Lp norm",
    "lp1": "with L1 norm",
    "lp2": "with L2 norm",
    "lpinf": "with L∞ norm",
    "lp_inf": "with L∞ norm",
}
FONT_FAMILIES = {"serif": "DejaVu Serif", "sans-serif": "DejaVu Sans"}


def order_arms(arms: Iterable[str]) -> list[str]:
    """Arms in the canonical order (none, bn, noisy_bn, ln, gn, lp and its spellings), unknown ones
    after, sorted."""
    arms = set(arms)
    known = [a for a in ARM_ORDER if a in arms]
    return known + sorted(arms - set(known))


def arm_color(arm: str) -> str:
    """The fixed colour of an arm; unknown arms get a spare colour chosen by name (stable)."""
    if arm in ARM_PALETTE:
        return ARM_PALETTE[arm]
    return _SPARE_COLOURS[sum(map(ord, arm)) % len(_SPARE_COLOURS)]


def arm_label(arm: str) -> str:
    """Legend label of an arm."""
    return ARM_LABELS.get(arm, arm)


def arm_title(arm: str) -> str:
    """Panel title of an arm ("with BN", "without BN", ...)."""
    return ARM_TITLES.get(arm, f"arm {arm}")


def paper_bundles() -> list[str]:
    """Names of the tueplots bundles usable with ``paper=`` (empty when tueplots is missing)."""
    try:
        from tueplots import bundles
    except ImportError:
        return []
    skip = {"figsizes", "fonts", "fontsizes", "axes", "cycler", "palettes", "rgb"}
    return sorted(n for n in dir(bundles) if not n.startswith("_") and n not in skip and callable(getattr(bundles, n)))


def _bundle(name: str, nrows: int = 1, ncols: int = 1) -> dict:
    """rcParams of a tueplots bundle, without LaTeX, at full text width where it has a choice."""
    try:
        from tueplots import bundles
    except ImportError:
        raise ValueError("paper bundles need tueplots (pip install 'icsk[paper]')") from None
    fn = getattr(bundles, name, None)
    if name not in paper_bundles() or fn is None:
        raise ValueError(f"unknown paper bundle {name!r}; choose from {paper_bundles()}")
    params = inspect.signature(fn).parameters
    kw: dict = {"usetex": False, "nrows": nrows, "ncols": ncols}
    if "column" in params:
        kw["column"] = "full"
    if "rel_width" in params:
        kw["rel_width"] = 1.0
    if "family" in params:
        kw["family"] = "serif"
    kw = {k: v for k, v in kw.items() if k in params}
    return dict(fn(**kw))


def text_width(paper: str | None) -> float | None:
    """Full text width in inches of a paper bundle (None without one)."""
    if not paper:
        return None
    return float(_bundle(paper)["figure.figsize"][0])


def style_rc(paper: str | None = None) -> dict:
    """rcParams of the icsk look: seaborn paper theme, then the paper bundle, DejaVu fonts, no LaTeX."""
    with mpl.rc_context():
        sns.set_theme(context="paper", style="whitegrid", font_scale=1.0)
        rc = {k: mpl.rcParams[k] for k in mpl.rcParams if k not in ("backend",)}
    family = "sans-serif"
    if paper:
        b = _bundle(paper)
        family = b.get("font.family", "serif")
        family = family[0] if isinstance(family, list) else family
        rc.update({k: v for k, v in b.items() if k != "text.latex.preamble"})
    family = family if family in FONT_FAMILIES else "sans-serif"
    rc.update(
        {
            "text.usetex": False,
            "font.family": family,
            "font.serif": [FONT_FAMILIES["serif"]],
            "font.sans-serif": [FONT_FAMILIES["sans-serif"]],
            "mathtext.fontset": "dejavuserif" if family == "serif" else "dejavusans",
            "figure.constrained_layout.use": True,
            "figure.autolayout": False,
            "pdf.fonttype": 42,
            "ps.fonttype": 42,
            "legend.frameon": False,
        }
    )
    return rc


@contextmanager
def style_context(paper: str | None = None) -> Iterator[None]:
    """Apply the icsk style inside a block; the caller's rcParams are restored after it."""
    rc = style_rc(paper)
    with mpl.rc_context(rc):
        yield


class _Paper:
    """Holds the active paper width (rcParams cannot carry custom keys)."""

    width: float | None = None


@contextmanager
def report_style(paper: str | None = None) -> Iterator[None]:
    """Style context used by report builds: like :func:`style_context`, and panel sizes follow
    the paper's text width."""
    old = _Paper.width
    _Paper.width = text_width(paper)
    try:
        with style_context(paper):
            yield
    finally:
        _Paper.width = old


def grid_size(ncols: int, nrows: int = 1, *, panel: tuple[float, float] = (3.0, 2.3), aspect: float = 0.75) -> tuple[float, float]:
    """Figure size for ``nrows x ncols`` panels: full text width of the active paper bundle
    (see :func:`report_style`), else ``panel`` inches per panel (width capped at 14 in)."""
    if _Paper.width:
        w = _Paper.width
        return w, min(max(1.9, w / ncols * aspect), 2.4) * nrows
    return min(panel[0] * ncols, 14.0), panel[1] * nrows
