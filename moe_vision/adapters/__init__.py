"""Adapters trained while pre-trained weights stay frozen: multi-scale bottleneck adapters and
the language-prior LV-Adapter."""
from .language import DEFAULT_LANGUAGE, LanguagePrior, fill_text_embeddings, language_config, language_losses
from .multiscale import DEFAULT_ADAPTERS, ModelAdapters, MultiScaleAdapter

__all__ = ["DEFAULT_ADAPTERS", "DEFAULT_LANGUAGE", "LanguagePrior", "ModelAdapters", "MultiScaleAdapter",
           "fill_text_embeddings", "language_config", "language_losses"]
