"""Oxford-IIIT Pet (37 breeds) with the trimap's pet pixels as the mask (torchvision's layout).

Layout: ``data_dir/oxford-iiit-pet/images/<id>.jpg``, ``annotations/{trainval,test}.txt`` and
``annotations/trimaps/<id>.png`` (1 pet, 2 background, 3 boundary), as the two official tarballs
extract. Nothing is downloaded. ``trainval`` is cut into train and a seeded ``val_size`` holdout;
``test`` is the test split. ``boundary=true`` counts the boundary band as object too.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import OxfordIIITPet

from xaudit.data.masked import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileDataModule,
    MaskedImageDataset,
    MaskImage,
    holdout,
    missing_listing,
)
from xaudit.utils.errors import DataNotFoundError


class OxfordPetDataModule(FileDataModule):
    """Oxford-IIIT Pet breeds with trimap masks (``has_masks``).

    Args:
        data_dir: the folder holding ``oxford-iiit-pet/{images,annotations}`` (no download).
        boundary: count the trimap's boundary band as pet too.
        val_size: seeded holdout of trainval (a fraction or a count).
        image_size: side of the square network input (shorter side resized, centre crop).
        mean: per-channel normalisation mean (ImageNet's by default).
        std: per-channel normalisation standard deviation.
        augment: random horizontal flip of the training images.
        batch_size: training batch size (per process).
        eval_batch_size: validation/test/predict batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`auto_num_workers`).
        seed: seeds the generated data or the validation holdout, and the DDP training sampler.
    """

    has_masks = True

    def __init__(self, data_dir: str, boundary: bool = False, val_size: float = 0.1, image_size: int = 224,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 augment: bool = True, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int | str = 0, seed: int = 0) -> None:
        super().__init__(image_size=image_size, mean=mean, std=std, augment=augment, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.data_dir, self.boundary, self.val_size = Path(str(data_dir)).expanduser(), bool(boundary), val_size
        base = self.data_dir / "oxford-iiit-pet"
        need = [base / "images", base / "annotations" / "trimaps", base / "annotations" / "trainval.txt",
                base / "annotations" / "test.txt"]
        absent = [str(p) for p in need if not p.exists()]
        if absent:
            raise DataNotFoundError(
                f"No Oxford-IIIT Pet at data.data_dir={str(self.data_dir)!r} (missing {', '.join(absent)}): "
                f"expected {base}/images/<id>.jpg and {base}/annotations/{{trainval.txt,test.txt,trimaps/<id>.png}}, "
                "as images.tar.gz and annotations.tar.gz extract; set data.data_dir to the folder holding "
                "oxford-iiit-pet.")
        pet = self._pet("trainval")
        self.class_names = list(pet.classes)
        self.num_classes = max(len(pet.classes), max(pet._labels, default=0) + 1)

    def _pet(self, split: str) -> OxfordIIITPet:
        return OxfordIIITPet(str(self.data_dir), split=split, target_types=("category", "segmentation"),
                             download=False)

    def split_names(self) -> dict[str, str]:
        return {"train": "trainval", "val": "trainval", "test": "test"}

    def dataset(self, split: str, train: bool) -> MaskedImageDataset:
        # torchvision keeps the file lists in private attributes; reading them avoids decoding every image
        pet = self._pet(self.split_names()[split])
        images, labels, trimaps = [str(p) for p in pet._images], list(pet._labels), [str(p) for p in pet._segs]
        missing = [p for p in [*images, *trimaps] if not Path(p).is_file()]
        if missing:
            raise DataNotFoundError(f"{len(missing)} file(s) listed in {pet._anns_folder} are missing: "
                                    f"{missing_listing(missing)}.")
        keep = range(len(images))
        if split != "test":
            train_idx, val_idx = holdout(len(images), self.val_size, self.seed)
            keep = train_idx if split == "train" else val_idx
        values = (1, 3) if self.boundary else (1,)
        return MaskedImageDataset([(images[i], labels[i]) for i in keep], self.transform(train),
                                  self.data_dir / "oxford-iiit-pet", [MaskImage(trimaps[i], values) for i in keep],
                                  self.class_names)
