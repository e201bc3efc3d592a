"""Figure layout shared by the image grids of every layer (Grad-CAM in models, predictions in training)."""

from __future__ import annotations


def grid_margins(fig, *, left: float = 0.01, top_title: bool = False) -> None:
    """Fixed margins for a grid of images with small titles and no ticks: what tight_layout would find,
    without measuring every axis (seconds for a few dozen of them)."""
    inch = fig.get_figheight()
    top = 1 - (0.45 + (0.35 if top_title else 0)) / inch  # a two-line tile title, and the figure's
    fig.subplots_adjust(left=left, right=0.99, bottom=0.02, top=top, wspace=0.05, hspace=0.45)

