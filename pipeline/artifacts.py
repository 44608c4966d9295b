"""Lazy access to every artifact of a cache folder, for notebooks, `transfgu inspect` and the report.

```python
from pipeline.artifacts import open_artifacts
art = open_artifacts("cache")
art.features["patch"]                 # dask (N, h, w, D) float16, nothing read yet
cam, label = art.pseudolabels("img_0001")
members = art.concept_members(3)      # crop rows of concept 3, nearest its centroid first
logits, pred = art.predictions("img_0001")   # runs the trained model on that image
```
Nothing is read when the object is created: each property opens its artifact on first
use, so a cache with only some stages done is still usable up to where it stops.
Images are addressed by manifest index (int) or image id (str) everywhere; the
manifest, the feature store and the pseudo labels share the same image order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.errors import InputError
from pipeline.layout import artifact_path

ImageKey = int | str

@dataclass
class ConceptMembers:
    """The crops assigned to one concept, nearest its centroid first (m crops).

    rows: (m,) crop rows of the feature store; boxes: (m, 4) (y0, x0, y1, x1) in the
    concept-scale image; images: (m,) manifest index of each crop's image;
    distances: (m,) L2 distance to the centroid in the space k-means clustered.
    """

    concept: int
    pool: str
    rows: np.ndarray
    boxes: np.ndarray
    images: np.ndarray
    distances: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def head(self, n: int) -> "ConceptMembers":
        """The `n` crops nearest the centroid."""
        return ConceptMembers(self.concept, self.pool, self.rows[:n], self.boxes[:n], self.images[:n],
                              self.distances[:n])


class Artifacts:
    """Read-only view of one cache folder; see the module docstring. Close it (or use `with`)
    to release the HDF5 handle."""

    def __init__(self, cache_dir: str | Path = "cache", *, weights: str | None = None,
                 device: str = "cpu") -> None:
        self.cache_dir = Path(cache_dir)
        self.weights = weights
        self.device = device
        self._manifest = None
        self._features = None
        self._store = None
        self._concepts = None
        self._h5 = None
        self._h5_index: dict[str, int] | None = None
        self._segmenter = None
        self._backbone = None
        self._crop_distances: np.ndarray | None = None
        self._concept_images: dict[int, np.ndarray] = {}
        self._ids: dict[str, int] | None = None

    # ------------------------------------------------------------------ paths and lifetime
    def path(self, key: str) -> Path:
        """Where artifact `key` (a name of pipeline.layout.ARTIFACTS) lives in this cache."""
        return artifact_path(self.cache_dir, key)

    def has(self, key: str) -> bool:
        """Whether the artifact `key` exists (its stage has run)."""
        path = self.path(key)
        if key == "concepts":
            return (path / "concepts.npz").exists()
        return path.exists()

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "Artifacts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ manifest and images
    @property
    def manifest(self):
        """`pipeline.data.Manifest` of cache/manifest.json."""
        if self._manifest is None:
            from pipeline.data import Manifest

            # a relative data root is the project's: the folder the cache folder sits in
            self._manifest = Manifest.load(self.path("manifest"), project_dir=self.cache_dir.resolve().parent)
        return self._manifest

    @property
    def image_ids(self) -> list[str]:
        return [r.id for r in self.manifest.records]

    def index(self, key: ImageKey) -> int:
        """Manifest index of an image given by index or id."""
        n = len(self.manifest.records)
        if isinstance(key, (int, np.integer)):
            if not -n <= int(key) < n:
                raise InputError(self.path("manifest"), f"image index {key} out of range (0..{n - 1})")
            return int(key) % n
        ids = self._id_index()
        if key not in ids:
            sample = ", ".join(list(ids)[:5])
            raise InputError(self.path("manifest"), f"no image with id '{key}' (ids look like: {sample})")
        return ids[key]

    def _id_index(self) -> dict[str, int]:
        if self._ids is None:
            self._ids = {r.id: i for i, r in enumerate(self.manifest.records)}
        return self._ids

    def select(self, ids: Iterable[str] = (), indices: Iterable[int] = (), random: int = 0, seed: int = 0,
               split: str | None = None) -> list[int]:
        """Manifest indices chosen by id, by index and/or `random` draws (seeded) from `split`
        (all images when None), in that order, without repeats."""
        chosen = [self.index(i) for i in ids] + [self.index(int(i)) for i in indices]
        if random:
            pool = [i for i, r in enumerate(self.manifest.records) if split is None or r.split == split]
            pool = [i for i in pool if i not in chosen]
            if not pool:
                raise InputError(self.path("manifest"), f"no images in split '{split}' to draw from")
            rng = np.random.default_rng(seed)
            chosen += sorted(rng.choice(pool, size=min(random, len(pool)), replace=False).tolist())
        return list(dict.fromkeys(chosen))

    def image(self, key: ImageKey, size: tuple[int, int] | None = None) -> np.ndarray:
        """Image (H, W, 3) uint8, at its own size or resized to `size` (H, W)."""
        return self.manifest.image(self.index(key), size)

    def label(self, key: ImageKey) -> np.ndarray | None:
        """Ground-truth class ids (H, W) uint8 (255 ignore), None for an image without label."""
        from pipeline.data import load_label

        manifest = self.manifest
        record = manifest.records[self.index(key)]
        if record.label is None:
            return None
        return load_label(manifest.resolve(record.label), manifest.dataset, len(manifest.class_names),
                          expect_size=(record.height, record.width))

    # ------------------------------------------------------------------ features
    @property
    def features(self) -> dict:
        """Lazy dask arrays keyed like the store (pipeline.store.feature_arrays): 'embedding' (N, D),
        'saliency' (N, h, w), 'patch' (N, h, w, D) (NaN outside the evaluation split),
        'patch_sample' (N * S, D), 'crops/embedding' (N * W, D), 'crops/kind' (N * W,) (NaN
        and 255 for images without crops). Crop row r is window r % W of image r // W."""
        if self._features is None:
            from pipeline.store import features_as_dask

            self.feature_store  # existence check with a useful message
            self._features = features_as_dask(self.path("features"))
        return self._features

    @property
    def feature_store(self):
        """The zarr group itself (attrs, direct chunk reads)."""
        if self._store is None:
            from pipeline.store import open_features

            self._store = open_features(self.path("features"), verify=True)
        return self._store

    @property
    def feature_attrs(self) -> dict:
        return dict(self.feature_store.attrs)

    def features_xarray(self):
        """The features as an `xarray.Dataset` with named dimensions (image, y, x, channel; crop,
        corner) and image ids as coordinates. Needs xarray (`pip install xarray`)."""
        try:
            import xarray as xr
        except ImportError as exc:
            raise ImportError("features_xarray() needs xarray: pip install xarray "
                              "(art.features gives the same arrays as dask without it)") from exc
        import dask.array as da

        f = self.features
        windows = np.asarray(self.feature_attrs["windows"], dtype=np.int32).reshape(-1, 4)
        crop_rows = da.arange(f["crops/kind"].shape[0], chunks=f["crops/kind"].chunks)
        return xr.Dataset(
            {
                "patch": (("image", "y", "x", "channel"), f["patch"]),
                "embedding": (("image", "channel"), f["embedding"]),
                "saliency": (("image", "y", "x"), f["saliency"]),
                "crop_embedding": (("crop", "channel"), f["crops/embedding"]),
                "crop_box": (("crop", "corner"), da.from_array(windows)[crop_rows % max(len(windows), 1)]),
                "crop_image": (("crop",), crop_rows // max(len(windows), 1)),
                "crop_kind": (("crop",), f["crops/kind"]),
            },
            coords={"image": self.image_ids, "corner": ["y0", "x0", "y1", "x1"]},
            attrs={k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in self.feature_attrs.items()},
        )

    # ------------------------------------------------------------------ concepts
    @property
    def concepts(self):
        """`pipeline.concepts.Concepts`: centroids (K, D), pools, sizes, assignment (M,)."""
        if self._concepts is None:
            from pipeline.concepts import Concepts

            self._concepts = Concepts.load(self.path("concepts"))
        return self._concepts

    def crop_distances(self, block_rows: int = 65536, show_progress: bool = True) -> np.ndarray:
        """(M,) float32 distance of every crop to its concept's centroid (inf when unassigned).

        One streamed pass over `crops/embedding`, cached: member lists of every concept
        then cost nothing, where reading each concept's scattered rows would read the
        whole array once per concept.
        """
        if self._crop_distances is None:
            from pipeline.runtime import progress

            concepts = self.concepts
            embeddings = self.feature_store["crops/embedding"]
            if len(concepts.assignment) != embeddings.shape[0]:
                raise InputError(self.path("concepts"), f"assigns {len(concepts.assignment)} crops but the "
                                 f"feature store has {embeddings.shape[0]}; rerun the concepts stage")
            per = max(int(self.feature_attrs.get("windows_per_image", 1)), 1)
            block = max(per, block_rows // per * per)     # whole chunks only: each is read once
            out = np.full(len(concepts.assignment), np.inf, dtype=np.float32)
            with progress(total=len(out), desc="crop distances", unit="crop", enabled=show_progress) as bar:
                for start in range(0, len(out), block):
                    stop = min(start + block, len(out))
                    assigned = concepts.assignment[start:stop]
                    keep = np.flatnonzero(assigned >= 0)
                    if len(keep):
                        x = np.asarray(embeddings[start:stop], dtype=np.float32)[keep]
                        if concepts.normalize:
                            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                        diff = x - concepts.centroids[assigned[keep]]
                        out[start + keep] = np.linalg.norm(diff, axis=1)
                    bar.update(stop - start)
            self._crop_distances = out
        return self._crop_distances

    def concept_members(self, concept: int, nearest: int | None = None) -> ConceptMembers:
        """The crops of `concept`, nearest its centroid first (all of them, or `nearest`)."""
        concepts = self.concepts
        if not 0 <= concept < concepts.k:
            raise InputError(self.path("concepts"), f"concept {concept} out of range (0..{concepts.k - 1})")
        rows = np.flatnonzero(concepts.assignment == concept)
        distances = self.crop_distances()[rows]
        order = np.argsort(distances, kind="stable")[:nearest]
        rows = rows[order]
        windows = np.asarray(self.feature_attrs["windows"], dtype=np.int32).reshape(-1, 4)
        boxes, images = windows[rows % len(windows)], rows // len(windows)   # crop row r: window r % W of image r // W
        return ConceptMembers(concept, concepts.pools[concept], rows, np.asarray(boxes),
                              np.asarray(images), distances[order])

    def crop(self, image: int, box: Sequence[int], size: int | None = None) -> np.ndarray:
        """The crop `box` (y0, x0, y1, x1, concept-scale pixels) of manifest image `image`,
        (h, w, 3) uint8, resized to size x size when given."""
        from pipeline.data import resize_image

        image = int(image)
        if image not in self._concept_images:
            if len(self._concept_images) >= 32:          # crops of one gallery cluster on few images
                self._concept_images.pop(next(iter(self._concept_images)))
            concept_size = tuple(int(v) for v in self.feature_attrs["concept_size"])
            self._concept_images[image] = self.image(image, concept_size)
        y0, x0, y1, x1 = (int(v) for v in box)
        patch = self._concept_images[image][y0:y1, x0:x1]
        return resize_image(patch, (size, size)) if size else patch

    # ------------------------------------------------------------------ pseudo labels
    def _pseudolabel_file(self):
        if self._h5 is None:
            from pipeline.store import open_pseudolabels

            self._h5 = open_pseudolabels(self.path("pseudolabels"))
            ids = self._h5["image_id"][:]
            self._h5_index = {(v.decode() if isinstance(v, bytes) else str(v)): i for i, v in enumerate(ids)}
        return self._h5

    @property
    def pseudolabel_attrs(self) -> dict:
        from pipeline.store import read_h5_attrs

        return read_h5_attrs(self._pseudolabel_file())

    def pseudolabel_row(self, key: ImageKey) -> int:
        """Row of the image in pseudolabels.h5 (looked up by id, so a reordered file still works)."""
        self._pseudolabel_file()
        image_id = self.image_ids[self.index(key)] if isinstance(key, (int, np.integer)) else key
        if image_id not in self._h5_index:
            raise InputError(self.path("pseudolabels"), f"has no image '{image_id}'; rerun the pseudolabels stage")
        return self._h5_index[image_id]

    def pseudolabels(self, key: ImageKey) -> tuple[np.ndarray, np.ndarray]:
        """(cam (K, h, w) float32, label (h, w) concept ids) of one image, read from HDF5."""
        from pipeline.store import read_cams, read_label

        handle = self._pseudolabel_file()
        row = self.pseudolabel_row(key)
        return read_cams(handle, row), read_label(handle, row)

    def pseudolabel_scores(self, key: ImageKey):
        """Min-max normalised CAMs (K, h, w) torch float32: the pseudo labels as scores, exactly
        as the evaluate stage scores them."""
        from pipeline.evaluate import cam_scores

        return cam_scores(self._pseudolabel_file(), self.pseudolabel_row(key))

    # ------------------------------------------------------------------ model
    @property
    def segmenter(self):
        """The trained Segmenter around the backbone the features were made with (loaded once)."""
        if self._segmenter is None:
            from pipeline.train.inference import load_segmenter

            self._segmenter = load_segmenter(self._new_backbone(), self.path("model")).to(self.device).eval()
        return self._segmenter

    def _new_backbone(self):
        """The backbone the features were made with (its weights: `weights`, else the run's)."""
        from pipeline.backbones import create_backbone

        attrs = self.feature_attrs
        weights = self.weights if self.weights is not None else (attrs.get("weights_source") or None)
        return create_backbone(attrs["backbone"], weights=weights)

    def patch_features(self, keys: Sequence[ImageKey]) -> np.ndarray:
        """Patch features (n, h, w, D) float16 of images given by index or id: read from the store
        for the images it holds (the evaluation split), computed by the backbone for the others."""
        import torch

        from pipeline.data import images_to_tensor
        from pipeline.runtime import autocast
        from pipeline.store import read_rows

        store, indices = self.feature_store, [self.index(k) for k in keys]
        out = np.empty((len(indices), *store["patch"].shape[1:]), dtype=np.float16)
        held = np.isin(indices, np.asarray(self._eval_indices()))
        order = np.argsort(indices)                      # zarr reads increasing indices fastest
        stored = [j for j in order if held[j]]
        if stored:
            out[stored] = read_rows(store, "patch", np.asarray(indices)[stored])
        missing = [j for j in range(len(indices)) if not held[j]]
        if missing:
            if self._backbone is None:
                self._backbone = self._new_backbone().to(self.device).eval()
            # as the features stage computes them (bf16 autocast on CUDA)
            with torch.no_grad(), autocast(self.device):
                for j in missing:
                    image = images_to_tensor(self.image(indices[j], self.model_input_size())).to(self.device)
                    out[j] = self._backbone(image).patch[0].float().cpu().numpy().astype(np.float16)
        return out

    def _eval_indices(self) -> list[int]:
        split = self.feature_attrs.get("eval_split")
        return [i for i, r in enumerate(self.manifest.records) if r.split == split]

    def model_input_size(self) -> tuple[int, int]:
        """Training size (H, W) the model and the pseudo labels were computed at."""
        h, w = self.feature_attrs["image_size"]
        return int(h), int(w)

    def predictions(self, key: ImageKey) -> tuple[np.ndarray, np.ndarray]:
        """(logits (K, h, w) float32, cluster ids (h, w) int64) of the trained model on one
        image at the training size; computed on demand (nothing is cached on disk)."""
        import torch

        from pipeline.data import images_to_tensor
        from pipeline.runtime import autocast

        size = self.model_input_size()
        x = images_to_tensor(self.image(key, size))
        with torch.no_grad(), autocast(self.device):      # as the evaluate stage predicts
            logits = self.segmenter(x.to(self.device))[0].float().cpu().numpy()
        return logits, logits.argmax(0)

    # ------------------------------------------------------------------ evaluation outputs
    @property
    def metrics(self) -> dict:
        """cache/metrics.json: rows model / pseudo_labels / bottom_up (+ 'evaluation')."""
        path = self.path("metrics")
        if not path.exists():
            raise InputError(path, "metrics not found; run the evaluate stage first")
        return json.loads(path.read_text())

    @property
    def matching(self) -> dict[str, list[int]] | None:
        """Hungarian matching cluster -> class per row, from evaluate (None before it ran)."""
        path = self.path("matching")
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def train_log(self) -> dict[str, np.ndarray]:
        """cache/model/train_log.csv as columns (epoch, loss, ce, ...) of float arrays."""
        from pipeline.train.curves import read_train_log

        return read_train_log(self.path("train_log"))


def open_artifacts(cache_dir: str | Path = "cache", *, weights: str | None = None,
                   device: str = "cpu") -> Artifacts:
    """Lazy view of the artifacts under `cache_dir`.

    weights: backbone weights file for `predictions()`; by default the one the feature
    store records (`backbone.weights` of the run), else the backbone's default source.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise InputError(cache_dir, "cache folder not found; run the pipeline first (dvc repro)")
    return Artifacts(cache_dir, weights=weights, device=device)
