"""Data: dataset strings, image decoding, transforms, the built-in sample set and SSL augmentation."""

from .augmentations import DataAugmentationDINO
from .collate import SSLBatch, SSLCollate, collate_data_and_cast
from .datasets import ImageDataset, make_dataset, parse_dataset_str
from .imagenet import ImageNetDataset, dump_imagenet_extra, make_imagenet_dataset
from .images import ImageFiles, collate_skip_bad, load_image
from .listing import find_images, resolve_image_inputs
from .loaders import SSLDataset, make_ssl_data_loader
from .masking import MaskingGenerator
from .sample import SAMPLE_CLASSES, write_sample_dataset
from .samplers import InfiniteStreamSampler, derive_seed
from .transforms import make_classification_eval_transform, make_classification_train_transform

__all__ = [
    "DataAugmentationDINO",
    "ImageDataset",
    "ImageFiles",
    "ImageNetDataset",
    "InfiniteStreamSampler",
    "MaskingGenerator",
    "SAMPLE_CLASSES",
    "SSLBatch",
    "SSLCollate",
    "SSLDataset",
    "collate_data_and_cast",
    "collate_skip_bad",
    "derive_seed",
    "dump_imagenet_extra",
    "find_images",
    "load_image",
    "make_classification_eval_transform",
    "make_classification_train_transform",
    "make_dataset",
    "make_imagenet_dataset",
    "make_ssl_data_loader",
    "parse_dataset_str",
    "resolve_image_inputs",
    "write_sample_dataset",
]
