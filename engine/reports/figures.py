"""Pictures for pages: images and matplotlib figures inlined into HTML as PNG data URIs.

The one place that picks matplotlib's file-only backend (Agg: no display on servers and CI), so
every report, plot and grid draws the same way whichever module imports pyplot first.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from data_pipeline.images import png_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png_data_uri(image_u8: np.ndarray) -> str:
    """A uint8 grayscale image as a `data:image/png;base64,...` URI."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image_u8)).decode("ascii")


def figure_data_uri(fig, dpi: int = 90) -> str:
    """A matplotlib figure as a PNG data URI; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_img(fig, css: str = 'style="max-width:100%"') -> str:
    """A matplotlib figure as an <img> element (closed after rendering)."""
    return f'<img {css} src="{figure_data_uri(fig)}" alt="">'
