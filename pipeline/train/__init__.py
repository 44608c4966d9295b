"""Training of the segmentation decoder on the cached CAM pseudo labels, with bootstrapping.

One module per job (import from them directly; this package file imports nothing, so
that a stage depends only on the parts of training it uses):

- ``schedule``   when the teacher is updated, the peer-loss weight, per-epoch seeds
- ``augment``    photometric augmentation and the aligned image/CAM crop, batched
- ``losses``     targets from CAMs (and the teacher), uncertainty, diversity, peer loss
- ``data``       ``PseudoLabelDataset``: images with their CAMs
- ``state``      ``TrainState`` (decoders, optimiser, epoch, history) with ``state_dict`` /
  ``load_state_dict``; the checkpoint and model files
- ``loop``       ``train_segmenter``: the epoch loop and its hooks (progress, checkpoints)
- ``inference``  ``load_segmenter``, ``predict_logits``
- ``stage``      the `train` pipeline stage

What one epoch does (method.md, "Training"; reference ``*_trainval.py`` and
``models/segmenter/segmenter_thingstuff.py`` of damo-cv/TransFGU):

1. A batch of images at the training size (B, 3, H, W) and their CAMs (B, K, h, w).
2. Augmentation on the device: colour jitter / grayscale / blur on the full image, a
   random crop (side = ``crop_scale`` x image side, image aspect kept) resized to
   ``crop_output_fraction`` of the training size, the CAMs cropped by the same box with
   ``roi_align`` onto the crop's patch grid, and a horizontal flip of both.
3. Targets: argmax over K of min-max normalised CAMs; while bootstrapping, of
   ``teacher_mix * softmax(teacher logits) + (1 - teacher_mix) * normalised CAMs``.
4. Loss = CE + ``uncertainty_weight`` x (1 - (p_top1 - p_top2))
   + ``diversity_weight`` x mean over class pairs of (1 + cos)
   - alpha x CE(permuted-class target)  [peer loss, bootstrapping only].
5. Adam with L2 weight decay (not on biases / norms), gradients clamped element-wise.

Unsupervised model selection: no labels are ever read; the final model is the last one.
"""
