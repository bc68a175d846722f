"""Pictures of samples: image grids, the unmasking trajectory as a strip or GIF, and as text.

Images are flattened sub-pixel sequences (CIFAR-10: 32 x 32 x 3 = 3072 tokens in [0, 256)); a
sub-pixel still masked (id V) is drawn mid-grey. Text trajectories show masked tokens as `MASK_CHAR`.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from jaxtyping import Integer, UInt8
from PIL import Image

MASK_CHAR = "▒"
MASK_GREY = 128


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
    trajectory: Integer[np.ndarray, "steps n l"], shape: tuple[int, int, int], mask_id: int,
    frames: int = 10,
) -> Image.Image:
    """One row per sample, one column per chosen step: how each image unmasked."""
    picked = frame_indices(trajectory.shape[0], frames)
    images = np.stack([to_images(trajectory[i], shape, mask_id) for i in picked], axis=1)  # [n, f, ...]
    return image_grid(images.reshape(-1, *images.shape[2:]), columns=len(picked))


def trajectory_gif(
    trajectory: Integer[np.ndarray, "steps n l"], shape: tuple[int, int, int], mask_id: int,
    path: str | Path, frames: int = 50, ms_per_frame: int = 80,
) -> None:
    """An animated GIF of the grid of samples unmasking, holding the final frame for a second."""
    grids = [image_grid(to_images(trajectory[i], shape, mask_id))
             for i in frame_indices(trajectory.shape[0], frames)]
    durations = [ms_per_frame] * (len(grids) - 1) + [1000]
    grids[0].save(path, save_all=True, append_images=grids[1:], duration=durations, loop=0)


def render_text(tokens: Integer[np.ndarray, " l"], decode: Callable[[np.ndarray], str], mask_id: int) -> str:
    """Decoded text with each masked token shown as `MASK_CHAR`; runs of unmasked tokens are
    decoded together so multi-token characters survive."""
    tokens = np.asarray(tokens)
    out, start = [], 0
    for i in np.flatnonzero(tokens == mask_id):
        if i > start:
            out.append(decode(tokens[start:i]))
        out.append(MASK_CHAR)
        start = i + 1
    if start < tokens.size:
        out.append(decode(tokens[start:]))
    return "".join(out)


def text_trajectory(
    trajectory: Integer[np.ndarray, "steps l"], decode: Callable[[np.ndarray], str], mask_id: int,
    frames: int = 6,
) -> list[tuple[int, str]]:
    """(step, rendered text) at `frames` steps of one sample's trajectory."""
    return [(i + 1, render_text(trajectory[i], decode, mask_id))
            for i in frame_indices(trajectory.shape[0], frames)]
