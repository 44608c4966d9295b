"""`transfgu predict DIR_OR_IMAGES --out DIR`: the trained model on any images.

For every image: ``<name>.png``, the predicted cluster of every pixel at the image's own
size (uint8 ids, the model's K clusters = the concepts), and ``<name>_overlay.jpg``, the
image with one colour per cluster; ``clusters.json`` gives each cluster's colour, its
concept pool and, when the evaluate stage matched clusters to classes, the class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.artifacts import Artifacts
from pipeline.data import IMAGE_EXTENSIONS, images_to_tensor, load_image, resize_image
from pipeline.data.readers import list_images
from pipeline.errors import InputError
from pipeline.files import atomic_write, write_json
from pipeline.inspection import blend, colourise, palette
from pipeline.runtime import log, progress


def collect_images(inputs: Sequence[str | Path], recursive: bool = False) -> dict[str, Path]:
    """Output name -> image file, from files and folders (a folder's images, named by their
    path inside it with '/' as '__'). Two inputs with one name are an error."""
    found: dict[str, Path] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            pairs = [(p.relative_to(item).with_suffix("").as_posix().replace("/", "__"), p)
                     for p in list_images(item, recursive=recursive)]
            if not pairs:
                raise InputError(item, f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
        elif item.is_file():
            pairs = [(item.stem, item)]
        else:
            raise InputError(item, "no such file or folder")
        for name, path in pairs:
            if name in found and found[name] != path:
                raise InputError(path, f"has the same output name '{name}' as {found[name]}; predict them apart")
            found[name] = path
    return found


def predict_images(art: Artifacts, images: dict[str, Path], out_dir: str | Path) -> list[Path]:
    """Write the label PNG and colour overlay of each image (see the module docstring).

    Args:
        art: the run whose model predicts (its cache folder).
        images: output name -> image file (:func:`collect_images`).
        out_dir: where the files go (created).

    Returns: the label PNG paths, in the order of ``images``.
    """
    from pipeline.evaluate import PROTOCOLS, score_to_prediction
    from pipeline.train.inference import predict_logits

    out_dir = Path(out_dir)
    inputs = {path.resolve() for path in images.values()}
    for name in images:
        for written_file in (out_dir / f"{name}.png", out_dir / f"{name}_overlay.jpg", out_dir / "clusters.json"):
            if written_file.resolve() in inputs:
                raise InputError(written_file, "is one of the input images; choose an --out folder apart from "
                                               "the images, predict never overwrites them")
    model, size = art.segmenter, art.model_input_size()
    native = PROTOCOLS.get("native")          # scores upsampled to each image's own size
    written, k = [], None
    for name, path in progress(list(images.items()), desc="predict"):
        image = load_image(path)
        logits = predict_logits(model, images_to_tensor(resize_image(image, size)))[0].cpu()
        k = logits.shape[0]
        # uint8 ids up to 255 clusters (any image viewer opens them), 16-bit PNG beyond
        clusters = score_to_prediction(logits, image.shape[:2], size, native).astype(np.uint8 if k <= 255 else np.uint16)
        written.append(atomic_write(out_dir / f"{name}.png", lambda f: Image.fromarray(clusters).save(f, "PNG")))
        overlay = blend(image, colourise(clusters, palette(k)))
        atomic_write(out_dir / f"{name}_overlay.jpg", lambda f: Image.fromarray(overlay).save(f, "JPEG", quality=90))
    if k is not None:
        write_json(out_dir / "clusters.json", {"clusters": _cluster_table(art, k), "images": len(written)})
    log(f"predict: {len(written)} images -> {out_dir} (<name>.png cluster ids, <name>_overlay.jpg, clusters.json)")
    return written


def _cluster_table(art: Artifacts, k: int) -> list[dict]:
    pools = art.pseudolabel_attrs.get("concept_pools", []) if art.has("pseudolabels") else []
    matched = (art.matching or {}).get("model")
    classes = art.manifest.class_names if art.has("manifest") else []
    colours = palette(k)
    return [{"id": c, "colour": [int(v) for v in colours[c]],
             "concept_pool": pools[c] if c < len(pools) else None,
             "class": classes[matched[c]] if matched and c < len(matched) and 0 <= matched[c] < len(classes) else None}
            for c in range(k)]
