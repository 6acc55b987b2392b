"""Data: dataset strings, image decoding, transforms, the built-in sample set and SSL augmentation."""

from .datasets import ImageDataset, make_dataset, parse_dataset_str
from .images import ImageFiles, collate_skip_bad, find_images, load_image, resolve_image_inputs
from .sample import SAMPLE_CLASSES, write_sample_dataset
from .transforms import make_classification_eval_transform, make_classification_train_transform

__all__ = [
    "ImageDataset",
    "ImageFiles",
    "SAMPLE_CLASSES",
    "collate_skip_bad",
    "find_images",
    "load_image",
    "make_classification_eval_transform",
    "make_classification_train_transform",
    "make_dataset",
    "parse_dataset_str",
    "resolve_image_inputs",
    "write_sample_dataset",
]
