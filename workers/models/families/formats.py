"""How a family's images reach its model: the per-row image columns `workers.models.prompts.encode_records` stores,
their batch, and the batch of a subset of rows.

Four formats: Qwen-VL's (`PATCHES`: every image's flattened patches concatenated over the batch, located by
their (t, h, w) grid, plus `mm_token_type_ids`), per-image pixel tensors (`PIXELS`: [B, n_images, 3, H, W]
with a pixel mask, Idefics3 and SmolVLM), Gemma 3's fixed-size images (`IMAGES`: [B * n_images, 3, H, W],
plus `token_type_ids`) and InternVL's fixed-size tiles (`TILES`: [B * n_tiles, 3, H, W], plus their
`image_sizes`). Each format has a column only it has (`marker`), so encoded columns,
collated batches and a teacher's wire inputs say which format they are: callers that hold only a batch (the
teacher, row selection for a teacher resend) need no family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageFormat:
    """One image input format: `rows` splits a processor's image output into per-row arrays (pixels cast to
    `dtype`), `collate` batches those (given the batch's padded token ids and the image token id), `select`
    takes some rows (ascending) of a collated batch; `model_keys` are its forward inputs besides the text's."""

    marker: str
    model_keys: tuple[str, ...]
    rows: Callable[[Mapping, int, type], dict[str, np.ndarray]]
    collate: Callable[[Mapping, torch.Tensor, int], dict[str, torch.Tensor]]
    select: Callable[[dict, list[int]], dict[str, torch.Tensor]]


def object_array(items: list[np.ndarray]) -> np.ndarray:
    """A column of variable-shape arrays (one per row)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _concat_pixels(batch: Mapping) -> torch.Tensor:
    """Every row's pixels, concatenated in row order (fp32: rows are stored as fp16)."""
    return torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.float32) for p in batch["pixel_values"]]))


def _patch_rows(enc: Mapping, n: int, dtype: type) -> dict[str, np.ndarray]:
    pixels = np.asarray(enc["pixel_values"], dtype=dtype)
    grids = np.asarray(enc["image_grid_thw"], dtype=np.int64).reshape(n, 3)
    return {"pixel_values": object_array(np.split(pixels, np.cumsum(grids.prod(axis=1))[:-1])),
            "image_grid_thw": grids}


def _collate_patches(batch: Mapping, ids: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
    return {"mm_token_type_ids": (ids == image_token_id).int(), "pixel_values": _concat_pixels(batch),
            "image_grid_thw": torch.as_tensor(np.stack(batch["image_grid_thw"]), dtype=torch.long)}


def _select_patches(batch: dict, rows: list[int]) -> dict[str, torch.Tensor]:
    """Each row's patches follow it: they are cut out of the concatenation by the grids."""
    patches = batch["image_grid_thw"].prod(dim=1)
    starts = torch.cumsum(patches, 0) - patches
    pixels = torch.cat([batch["pixel_values"][starts[i]:starts[i] + patches[i]] for i in rows])
    index = torch.as_tensor(rows, dtype=torch.long)
    return {"mm_token_type_ids": batch["mm_token_type_ids"][index], "pixel_values": pixels,
            "image_grid_thw": batch["image_grid_thw"][index]}


PATCHES = ImageFormat("image_grid_thw", ("mm_token_type_ids", "pixel_values", "image_grid_thw"),
                      _patch_rows, _collate_patches, _select_patches)


def _pixel_rows(enc: Mapping, n: int, dtype: type) -> dict[str, np.ndarray]:
    """The processor pads every row to the batch's most images with all-zero, fully masked images: a row keeps
    only its own (those with any unmasked pixel)."""
    pixels = np.asarray(enc["pixel_values"], dtype=dtype)
    masks = np.asarray(enc["pixel_attention_mask"]).astype(bool)
    real = masks.any(axis=(2, 3))
    return {"pixel_values": object_array([p[r] for p, r in zip(pixels, real)]),
            "pixel_attention_mask": object_array([m[r] for m, r in zip(masks, real)])}


def _pad_images(rows: list[np.ndarray], dtype: type) -> torch.Tensor:
    """Stack per-row image stacks, padding each to the batch's most images with zeros (the model skips
    all-zero images, as it does the processor's padding)."""
    most = max(len(r) for r in rows)
    out = np.zeros((len(rows), most, *np.asarray(rows[0]).shape[1:]), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def _collate_pixels(batch: Mapping, ids: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": _pad_images(list(batch["pixel_values"]), np.float32),
            "pixel_attention_mask": _pad_images(list(batch["pixel_attention_mask"]), np.bool_)}


def _select_pixels(batch: dict, rows: list[int]) -> dict[str, torch.Tensor]:
    index = torch.as_tensor(rows, dtype=torch.long)
    return {k: batch[k][index] for k in ("pixel_values", "pixel_attention_mask")}


PIXELS = ImageFormat("pixel_attention_mask", ("pixel_values", "pixel_attention_mask"),
                     _pixel_rows, _collate_pixels, _select_pixels)

def _image_rows(enc: Mapping, n: int, dtype: type) -> dict[str, np.ndarray]:
    """Every row has as many images (one here), so the batch's image stack splits evenly. The processor's
    `token_type_ids` stay per row as the format's marker: `collate` marks the padded ids afresh, since a
    grounding row goes on past its prompt."""
    pixels = np.asarray(enc["pixel_values"], dtype=dtype)
    return {"pixel_values": object_array(np.split(pixels, n)),
            "token_type_ids": object_array([np.asarray(t, dtype=np.int8) for t in enc["token_type_ids"]])}


def _collate_images(batch: Mapping, ids: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
    """Gemma 3 attends bidirectionally within an image's tokens where `token_type_ids` is 1."""
    return {"token_type_ids": (ids == image_token_id).long(), "pixel_values": _concat_pixels(batch)}


def _stacked_rows(stack: torch.Tensor, n_rows: int, rows: list[int]) -> torch.Tensor:
    """Some rows' part of a stack over the batch that has as many entries (images) per row."""
    return stack.unflatten(0, (n_rows, -1))[torch.as_tensor(rows, dtype=torch.long)].flatten(0, 1)


def _select_images(batch: dict, rows: list[int]) -> dict[str, torch.Tensor]:
    types = batch["token_type_ids"]
    return {"token_type_ids": types[torch.as_tensor(rows, dtype=torch.long)],
            "pixel_values": _stacked_rows(batch["pixel_values"], len(types), rows)}


IMAGES = ImageFormat("token_type_ids", ("token_type_ids", "pixel_values"), _image_rows, _collate_images,
                     _select_images)


def _tile_rows(enc: Mapping, n: int, dtype: type) -> dict[str, np.ndarray]:
    """Every row has as many tiles (one per image: never cropped into more), so the batch's stacks of tiles and
    of their sizes split evenly. The sizes (`image_sizes`, each tile's (height, width), which InternVL's forward
    takes and leaves unused) are the format's marker: InternVL's own processor output has no other column."""
    return {"pixel_values": object_array(np.split(np.asarray(enc["pixel_values"], dtype=dtype), n)),
            "image_sizes": object_array(np.split(np.asarray(enc["image_sizes"], dtype=np.int64), n))}


def _collate_tiles(batch: Mapping, ids: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
    """The image tokens alone say where the tiles go (InternVL's decoder is causal throughout)."""
    return {"pixel_values": _concat_pixels(batch),
            "image_sizes": torch.as_tensor(np.concatenate([np.asarray(s) for s in batch["image_sizes"]]),
                                           dtype=torch.long)}


def _select_tiles(batch: dict, rows: list[int]) -> dict[str, torch.Tensor]:
    n_rows = len(batch["input_ids"])
    return {k: _stacked_rows(batch[k], n_rows, rows) for k in ("pixel_values", "image_sizes")}


TILES = ImageFormat("image_sizes", ("pixel_values", "image_sizes"), _tile_rows, _collate_tiles, _select_tiles)

FORMATS = (PATCHES, PIXELS, IMAGES, TILES)


def format_of(data: Mapping) -> ImageFormat:
    """The format of a processor output, encoded column batch, collated batch or wire dict, by its marker."""
    for fmt in FORMATS:
        if fmt.marker in data:
            return fmt
    raise KeyError(f"no image inputs of a known format (columns: {', '.join(data)}; one of "
                   f"{', '.join(f.marker for f in FORMATS)} expected)")
