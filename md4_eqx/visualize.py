"""Pictures: grids of image samples, the unmasking trajectory (a strip, a GIF or text), curves.

Images are flattened sub-pixel sequences (CIFAR-10: 32 x 32 x 3 = 3072 tokens in [0, 256)); a
sub-pixel still masked (id V) is drawn mid-grey. Text trajectories show masked tokens as
`MASK_CHAR`.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from jaxtyping import Integer, Real, UInt8
from PIL import Image, ImageDraw, ImageFont

MASK_CHAR = "▒"
MASK_GREY = 128
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44))  # one per series of a chart
GRID_GREY = (225, 225, 225)


def to_images(
    tokens: Integer[np.ndarray, "n l"], shape: tuple[int, int, int], mask_id: int
) -> UInt8[np.ndarray, "n h w c"]:
    """[n, H*W*C] sub-pixel tokens -> [n, H, W, C] uint8 images, masks mid-grey."""
    tokens = np.asarray(tokens)
    pixels = np.where(tokens == mask_id, MASK_GREY, tokens).astype(np.uint8)
    return pixels.reshape(tokens.shape[0], *shape)


def image_grid(
    images: UInt8[np.ndarray, "n h w c"], columns: int | None = None, scale: int = 2, pad: int = 2
) -> Image.Image:
    """A grid of images, `columns` wide (default: about square), each scaled up `scale` times."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        canvas[top : top + h, left : left + w] = image
    grid = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def frame_indices(steps: int, frames: int) -> list[int]:
    """`frames` steps spread evenly over a trajectory of `steps`, the last one included."""
    return sorted({round(i * (steps - 1) / max(frames - 1, 1)) for i in range(frames)})


def trajectory_strip(
    trajectory: Integer[np.ndarray, "steps n l"],
    shape: tuple[int, int, int],
    mask_id: int,
    frames: int = 10,
) -> Image.Image:
    """One row per sample, one column per chosen step: how each image unmasked."""
    picked = frame_indices(trajectory.shape[0], frames)
    # [n, f, ...]
    images = np.stack([to_images(trajectory[i], shape, mask_id) for i in picked], axis=1)
    return image_grid(images.reshape(-1, *images.shape[2:]), columns=len(picked))


def trajectory_gif(
    trajectory: Integer[np.ndarray, "steps n l"],
    shape: tuple[int, int, int],
    mask_id: int,
    path: str | Path,
    frames: int = 50,
    ms_per_frame: int = 80,
) -> None:
    """An animated GIF of the grid of samples unmasking, holding the final frame for a second."""
    grids = [
        image_grid(to_images(trajectory[i], shape, mask_id))
        for i in frame_indices(trajectory.shape[0], frames)
    ]
    durations = [ms_per_frame] * (len(grids) - 1) + [1000]
    grids[0].save(path, save_all=True, append_images=grids[1:], duration=durations, loop=0)


def render_text(
    tokens: Integer[np.ndarray, " l"], decode: Callable[[np.ndarray], str], mask_id: int
) -> str:
    """Decoded text with each masked token shown as `MASK_CHAR`; runs of unmasked tokens are
    decoded together so multi-token characters survive."""
    tokens = np.asarray(tokens)
    runs = np.split(tokens, np.flatnonzero(np.diff(tokens == mask_id)) + 1)  # all masked or all not
    return "".join(
        MASK_CHAR * run.size if run[0] == mask_id else decode(run) for run in runs if run.size
    )


def ticks(lo: float, hi: float, count: int = 6) -> np.ndarray:
    """About `count` round values in [lo, hi]: multiples of 1, 2 or 5 x 10^k, the step that gives
    the nearest number of them."""
    magnitude = 10 ** np.floor(np.log10((hi - lo) / count))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda s: abs((hi - lo) / s - count))
    return np.arange(np.ceil(lo / step), np.floor(hi / step) + 1) * step


def line_chart(
    series: dict[str, tuple[Real[np.ndarray, " _"], Real[np.ndarray, " _"]]],
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (720, 420),
) -> Image.Image:
    """Named (x, y) series on shared axes, with round ticks, a grid and a legend (training curves
    without a plotting library). The y range spans the values; a series of up to 50 points also
    marks each one with a dot."""
    width, height = size
    left, right, top, bottom = 56, 16, 24, 40  # margins around the plot area
    xs = np.concatenate([x for x, _ in series.values()], dtype=float)
    ys = np.concatenate([y for _, y in series.values()], dtype=float)
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
    pad = 0.05 * (ys.max() - ys.min()) or 0.05 * abs(ys.max()) or 1.0
    y0, y1 = ys.min() - pad, ys.max() + pad

    def at(x, y):  # data -> pixel
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            top + (y1 - y) / (y1 - y0) * (height - top - bottom),
        )

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    for x in ticks(x0, x1):
        px = at(x, y0)[0]
        draw.line([(px, top), (px, height - bottom)], fill=GRID_GREY)
        draw.text((px, height - bottom + 4), f"{x:,.0f}", fill="black", font=font, anchor="ma")
    for y in ticks(y0, y1):
        py = at(x0, y)[1]
        draw.line([(left, py), (width - right, py)], fill=GRID_GREY)
        draw.text((left - 4, py), f"{y:g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text(
        ((left + width - right) / 2, height - 4), xlabel, fill="black", font=font, anchor="md"
    )
    draw.text((left, top - 4), ylabel, fill="black", font=font, anchor="ld")
    for row, (colour, (name, (x, y))) in enumerate(zip(COLOURS, series.items(), strict=False)):
        points = [at(a, b) for a, b in zip(x, y, strict=True)]
        draw.line(points, fill=colour, width=2)
        for px, py in points if len(points) <= 50 else ():
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text(
            (width - right - 8, top + 8 + 16 * row), name, fill=colour, font=font, anchor="ra"
        )
    return image
