"""Datasets: reading images and labels, dataset readers (a registry) and the manifest.

Conventions (docs/architecture.md): images are ``(H, W, 3)`` uint8 RGB, labels ``(H, W)``
uint8 class ids with 255 = ignore, sizes are ``(height, width)``, and input problems raise
:class:`pipeline.errors.InputError` naming the file.
"""
from pipeline.data.images import (
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    images_to_tensor,
    load_image,
    open_image,
    read_label_array,
    read_size,
    resize_image,
    resize_label,
    stack_images,
    to_float_images,
)
from pipeline.data.manifest import ImageRecord, Manifest
from pipeline.data.readers import (
    DATASETS,
    DatasetReader,
    Entry,
    LabelDecoder,
    Scan,
    build_manifest,
    get_label_decoder,
    get_reader,
    load_label,
)
from pipeline.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from pipeline.data.synthetic import generate_synthetic

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "DatasetReader",
    "Entry",
    "ImageRecord",
    "LabelDecoder",
    "Manifest",
    "SYNTHETIC_CLASS_NAMES",
    "Scan",
    "build_manifest",
    "generate_synthetic",
    "get_label_decoder",
    "get_reader",
    "images_to_tensor",
    "load_image",
    "load_label",
    "open_image",
    "read_label_array",
    "read_size",
    "resize_image",
    "resize_label",
    "stack_images",
    "to_float_images",
]
