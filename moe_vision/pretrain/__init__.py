"""Pre-training objectives on the generalist's own backbone and query decoder: GLID-style masked
image modelling with decoder queries (task type ``mim``)."""
from .data import UnlabelledImages, images_under
from .masking import mask_image, normalised_patches, patchify, random_patch_mask, unpatchify
from .mim import MaskedImageModelingTask

__all__ = ["MaskedImageModelingTask", "UnlabelledImages", "images_under", "mask_image", "normalised_patches",
           "patchify", "random_patch_mask", "unpatchify"]
