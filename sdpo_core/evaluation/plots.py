"""Evaluation figures: reward vs denoising steps (matplotlib, Agg) and labelled image grids (PIL).

Both write PNGs of a size fixed by their arguments (no tight bounding box), so tests and
reports can rely on it. matplotlib is used through its object API with an Agg canvas: no
pyplot, no global backend switch in the caller's process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

PLOT_SIZE_IN = (6.4, 4.0)
PLOT_DPI = 100  # the plot is 640 x 400 px
MIN_CELL, MAX_CELL = 96, 256  # grid cells: tiny images upscaled, large ones downscaled
LABEL_W, HEADER_H, TITLE_H, PAD = 96, 46, 22, 4
FONT_SIZE, LINE_H = 12, 14
SERIES = {"base": ("tab:gray", 0.97), "trained": ("tab:blue", 1.03), "champion": ("tab:orange", 1.0)}  # colour, x offset (log axis)


def reward_vs_steps_plot(eval_dict: dict, path: str | Path) -> Path:
    """Mean reward with its 95% CI per step count, base vs trained, log2 x-axis; PNG at ``path``."""
    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = sorted(int(n) for n in eval_dict["steps"])
    for label, (colour, offset) in SERIES.items():
        rows = [eval_dict["steps"][str(n)].get(label) for n in steps]
        if any(r is None for r in rows):
            continue
        means = [r["mean"] for r in rows]
        err = [[r["mean"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["mean"] for r in rows]]
        ax.errorbar(
            [n * offset for n in steps], means, yerr=err, label=label, color=colour, marker="o", capsize=4
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.minorticks_off()
    ax.set_xlabel("denoising steps")
    ax.set_ylabel(f"{eval_dict['reward']} (mean, 95% CI)")
    ax.set_title(f"{eval_dict['pipeline']}: reward vs steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.14, right=0.97, top=0.9, bottom=0.13)
    fig.savefig(path, dpi=PLOT_DPI)
    return Path(path)


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of an image grid: panels stacked vertically, each ``rows`` x ``cols`` cells."""

    panels: int
    rows: int
    cols: int
    cell: int

    @classmethod
    def for_images(cls, panels: int, rows: int, cols: int, image_side: int) -> GridLayout:
        return cls(panels, rows, cols, min(MAX_CELL, max(MIN_CELL, image_side)))

    @property
    def panel_h(self) -> int:
        return TITLE_H + self.rows * (self.cell + PAD)

    @property
    def size(self) -> tuple[int, int]:
        return LABEL_W + self.cols * (self.cell + PAD) + PAD, HEADER_H + self.panels * self.panel_h + PAD

    def cell_xy(self, panel: int, row: int, col: int) -> tuple[int, int]:
        return LABEL_W + PAD + col * (self.cell + PAD), HEADER_H + panel * self.panel_h + TITLE_H + row * (
            self.cell + PAD
        )


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` px; the last line ends in '...' when text is cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + "..."
    return [_clip(draw, line, width, font) for line in lines]


def _clip(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-4] + "..."
    return text


def _to_cell(image: torch.Tensor, cell: int) -> Image.Image:
    """(3, H, W) float in [0, 1] or uint8 -> PIL image fitted into a ``cell`` square (aspect kept)."""
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    scale = cell / max(pil.size)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    # nearest keeps tiny images' pixels crisp when upscaled; Lanczos for large images
    return pil.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)


def image_grid(panels: dict[str, torch.Tensor], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """Labelled grid: one panel per entry of ``panels`` (e.g. base, trained), stacked vertically.

    Each panel is a (R, K, 3, H, W) tensor (float in [0, 1] or uint8): rows R (e.g. step
    counts, labelled by ``row_labels``), columns K (prompts, labelled once on top by ``col_labels``).
    """
    shapes = {tuple(t.shape) for t in panels.values()}
    if len(shapes) != 1:
        raise ValueError(f"all panels must have the same (R, K, 3, H, W) shape, got {sorted(shapes)}")
    rows, cols, _, h, w = shapes.pop()
    if (rows, cols) != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"panels are {rows} x {cols} but {len(row_labels)} x {len(col_labels)} labels were given"
        )
    layout = GridLayout.for_images(len(panels), rows, cols, max(h, w))
    canvas = Image.new("RGB", layout.size, "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for k, text in enumerate(col_labels):
        x, _ = layout.cell_xy(0, 0, k)
        for i, line in enumerate(_wrap(draw, text, layout.cell, font, HEADER_H // LINE_H)):
            draw.text((x, 2 + i * LINE_H), line, fill="black", font=font)
    for p, (title, images) in enumerate(panels.items()):
        y_title = HEADER_H + p * layout.panel_h
        draw.text((PAD, y_title + 4), title, fill="black", font=_font(FONT_SIZE + 2))
        draw.line([(PAD, y_title + TITLE_H - 3), (layout.size[0] - PAD, y_title + TITLE_H - 3)], fill="gray")
        for r in range(rows):
            _, y0 = layout.cell_xy(p, r, 0)
            draw.text(
                (PAD, y0 + layout.cell // 2 - LINE_H // 2),
                _clip(draw, row_labels[r], LABEL_W - 2 * PAD, font),
                fill="black",
                font=font,
            )
            for k in range(cols):
                x, y = layout.cell_xy(p, r, k)
                tile = _to_cell(images[r, k], layout.cell)
                canvas.paste(
                    tile, (x + (layout.cell - tile.width) // 2, y + (layout.cell - tile.height) // 2)
                )
    return canvas


def save_image_grid(
    panels: dict[str, torch.Tensor], row_labels: list[str], col_labels: list[str], path: str | Path
) -> Path:
    """:func:`image_grid` written as a PNG at ``path``."""
    image_grid(panels, row_labels, col_labels).save(path, format="PNG")
    return Path(path)
