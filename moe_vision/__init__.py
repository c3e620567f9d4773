"""moe-vision: modular mixture-of-experts vision models.

A task-conditioned sparse MoE-ViT backbone (:mod:`moe_vision.models`) built on the vision-free
MoE layer (:mod:`moe_vision.moe`).
"""
from .exactness import use_reproducible_mkl

use_reproducible_mkl()  # before anything below loads torch and runs MKL (see moe_vision/exactness.py)

from ._compat import check_torchvision  # noqa: E402

check_torchvision()

from .models import MoEViT, load_model, save_model, upcycle_from_dense  # noqa: E402
from .moe import MoEConfig  # noqa: E402
from .tasks import GeneralistModel  # noqa: E402  (also registers its checkpoint format)
from .surgery import load_bundle  # noqa: E402
from .inference import predict  # noqa: E402
from . import pretrain  # noqa: E402,F401  (registers the pre-training task types)

__version__ = "0.1.0"
__all__ = ["GeneralistModel", "MoEConfig", "load_bundle", "predict", "MoEViT", "load_model", "save_model", "upcycle_from_dense", "__version__"]
