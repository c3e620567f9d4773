"""Inference: a full model or a bundle on decoded images or files, predictions in each image's own
pixels, in the formats tools/predict.py, the server and export share."""
from .predict import image_files, predict, predict_batch, predict_folder, predict_image

__all__ = ["image_files", "predict", "predict_batch", "predict_folder", "predict_image"]
