"""Dataset readers for standard formats, transforms, heterogeneous sampling, synthetic benchmark."""
from .readers import ADE20KDataset, CocoDetectionDataset, DepthDataset, ImageFolderDataset, read_image
from .sampler import InfiniteBatches, TaskSampler, collate, task_probabilities
from .transforms import build_transforms

__all__ = ["ADE20KDataset", "CocoDetectionDataset", "DepthDataset", "ImageFolderDataset", "InfiniteBatches",
           "TaskSampler", "build_transforms", "collate", "read_image", "task_probabilities"]
