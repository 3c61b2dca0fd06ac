"""The ``image-folder`` training dataset: ``root/<identity>/<image>`` trees, identities sorted to class ids."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from facecore import hookimpl
from facecore.errors import DataError
from facecore.data.images import list_image_folder, skipped_placeholder, training_item, training_set_schema

SCHEMA = training_set_schema("Folder with one sub-folder of .jpg/.jpeg/.png images per identity.")


class ImageFolderDataset(Dataset):
    """(image, label) pairs from image files, images (3, H, W) uint8; ``classes`` lists identity names in class-id order.

    ``skipped`` counts images skipped in this process (``on_bad_image: skip``).
    """

    def __init__(self, root: str, train: bool = False, img_size: int = 112, on_bad_image: str = "stop"):
        if on_bad_image not in ("stop", "skip"):
            raise DataError(f"data.on_bad_image must be 'stop' or 'skip', got {on_bad_image!r}")
        self.root = root
        self.train = train  # the group's context argument; augmentation happens on the device (data.augment)
        self.img_size = img_size
        self.skip_bad = on_bad_image == "skip"
        self.skipped = 0
        self.classes, self.items = list_image_folder(root)
        self.num_classes = len(self.classes)
        self.labels = [label for _, label in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc.strerror}") from None
        image = training_item(data, img_size=self.img_size, where=str(path), skip_bad=self.skip_bad)
        if image is None:
            self.skipped += 1
            return skipped_placeholder(self.img_size), -1
        return image, label


@hookimpl
def register_datasets(register):
    register("image-folder", ImageFolderDataset, schema=SCHEMA,
             description="Training images in root/<identity>/<image> folders (jpg/png), identities sorted by name")
