"""The registered models as timm models: the checks of timm's own model test-suite
(tests/test_models.py of pytorch-image-models, which `make test-timm` runs unchanged on them),
kept here so `make test` needs no download. A plain call runs the model's first task."""
import fnmatch

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models._manipulate import group_parameters

import moe_vision  # noqa: F401  (registers the models)

NAMES = ["moe_vit_nano_patch8", "moe_vit_tiny_patch8"]


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_grad_checkpointing_give_logits_of_the_default_task(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *model.default_cfg["input_size"])
    out = model(x)
    assert out.shape == (1, model.num_features) and not out.isnan().any()  # num_classes 0: pooled features
    assert torch.equal(out, model(x, model.default_task)) and model.default_task == "cls"
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, *model.default_cfg["input_size"]))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_features_head_and_classifier_reset_on_the_meta_device(name):
    with torch.device("meta"):
        model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_model_arg=1)
    cfg = model.default_cfg
    assert model.in_chans == cfg["input_size"][0] and model.num_classes == 0 and model.head_hidden_size > 0
    x = torch.randn(1, *cfg["input_size"], device="meta")
    features = model.forward_features(x)
    spatial, channel = get_spatial_dim(model.output_fmt), get_channel_dim(model.output_fmt)
    assert tuple(features.shape[i] for i in spatial) == cfg["pool_size"] and features.shape[channel] == model.num_features
    pre = model.forward_head(features, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    model.to(torch.bfloat16)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)
    model.reset_classifier(0, "")
    assert model(x).shape == features.shape  # no pooling, no classifier: the unpooled maps
    assert timm.create_model(name, num_classes=0, global_pool="", device="meta").eval()(x).ndim == 4
    assert cfg["first_conv"] + ".weight" in model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    assert all(any(fnmatch.fnmatch(n, p) for n in names) for p in model.no_weight_decay())
    assert len(set(group_parameters(model, model.group_matcher(), reverse=True).values())) > 1
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(2)  # a new classifier where the model is
    assert model.get_classifier().weight.dtype == torch.float64 and model.get_classifier().weight.is_meta


@pytest.mark.parametrize("name", NAMES)
def test_features_only_gives_the_last_blocks_maps(name):
    model = timm.create_model(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    size = model.default_cfg["input_size"]
    maps = model(torch.randn(1, *size))
    assert len(maps) == len(channels) >= 3
    for c, r, m in zip(channels, reductions, maps):
        assert m.shape == (1, c, size[1] // r, size[2] // r) and not m.isnan().any()


@pytest.mark.parametrize("name", NAMES)
def test_fx_feature_extraction_traces_and_matches_eager(name):
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    model = timm.create_model(name).eval()
    x = torch.randn(1, *model.default_cfg["input_size"])
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    fx_model = create_feature_extractor(model, eval_return_nodes=[eval_nodes[-1]],
                                        train_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer)
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx_model(x).values())), model(x), rtol=1e-4, atol=1e-5)
