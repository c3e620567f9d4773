"""Pre-training objectives on the generalist's own backbone and query decoder: GLID-style masked
image modelling with decoder queries (task type ``mim``) and the hybrid multi-label + MIM +
contrastive objective (task type ``hybrid``)."""
from ..data.readers import images_under
from .data import UnlabelledImages
from .hybrid import HybridPretrainingTask, LabelSpace, TwoViewImages, info_nce, masked_bce
from .masking import mask_image, normalised_patches, patchify, random_patch_mask, unpatchify
from .mim import MaskedImageModelingTask

__all__ = ["HybridPretrainingTask", "LabelSpace", "MaskedImageModelingTask", "TwoViewImages", "info_nce",
           "masked_bce", "UnlabelledImages", "images_under", "mask_image", "normalised_patches",
           "patchify", "random_patch_mask", "unpatchify"]
