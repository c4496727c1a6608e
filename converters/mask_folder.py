"""Mask folders: each image `<stem>.<ext>` has a union mask `<stem>_mask.png` (foreground > 127).

Three layouts are recognised: masks beside the images (`<split>/a.jpg`, `<split>/a_mask.png`), in a
sibling folder (`train/a.jpg`, `train_masks/a_mask.png`, as the cracks train split here), or
`<split>/images/` with `<split>/masks/`. A mask holds no class, so all its objects get one class name;
instances are its 8-connected components (see `geometry.mask_components`). Image and mask are both taken in
their displayed frame (`paliseg.images`: EXIF orientation applied), and must have the same displayed size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from converters import geometry
from converters.sources import IssueLog, SourceImage, SourceSplit, image_files, image_size
from paliseg import images

MASK_SUFFIX = "_mask.png"


def find_layout(folder: Path) -> tuple[Path, Path] | None:
    """(image folder, mask folder) of a split folder, or None if it has no masks."""
    candidates = [
        (folder, folder),
        (folder, folder.with_name(folder.name + "_masks")),
        (folder / "images", folder / "masks"),
    ]
    for image_dir, mask_dir in candidates:
        if image_dir.is_dir() and mask_dir.is_dir() and any(mask_dir.glob(f"*{MASK_SUFFIX}")):
            return image_dir, mask_dir
    return None


def read_mask_folder_split(
    export: Path, split: str, image_folder: Path, mask_folder: Path, class_name: str
) -> SourceSplit:
    """A mask-folder split: its images, each with the components of its `<stem>_mask.png` as objects."""
    paths = image_files(image_folder)

    def read(log: IssueLog) -> Iterator[SourceImage]:
        for path in paths:
            where = str(path)
            mask_path = mask_folder / f"{path.stem}{MASK_SUFFIX}"
            if not mask_path.is_file():
                log.skip(where, "missing_mask", f"no mask {mask_path.name} in {mask_folder}")
                continue
            try:
                width, height = image_size(path)
                mask = images.read_mask(mask_path)
            except images.ImageReadError as error:
                log.skip(where, "corrupt_image", str(error))
                continue
            if mask.shape != (height, width):
                log.skip(
                    str(mask_path), "size_mismatch", f"mask is {mask.shape[1]}x{mask.shape[0]}, image {width}x{height}"
                )
                continue
            objects = geometry.mask_components(class_name, mask, str(mask_path), log)
            yield SourceImage(path, path.name, width, height, objects, where, source_id=path.stem)

    return SourceSplit(export, split, "masks", [class_name], len(paths), read, mask_folder)
