"""MoE-ViT backbone: timm registry, features, upcycling, checkpoints, bad input."""
import pytest
import timm
import torch

import moe_vision  # noqa: F401  (registers the entrypoints)
from moe_vision._compat import check_torchvision
from moe_vision.models import MODEL_ARGS, MoEViT, load_model, save_model, upcycle_from_dense
from moe_vision.models.checkpoint import load_weights

TASKS = ["cls", "det", "seg"]


def _nano(**kw):
    return timm.create_model("moe_vit_nano_patch8", tasks=TASKS, **kw).eval()


@pytest.mark.parametrize("name", sorted(MODEL_ARGS))
def test_registry_entrypoints_build(name):
    model = timm.create_model(name, tasks=["cls"], depth=2)  # shallow: just the construction path
    assert isinstance(model, MoEViT)
    assert model.embed_dim == MODEL_ARGS[name]["embed_dim"]
    assert name in timm.list_models("moe_vit_*")


def test_pretrained_is_refused_without_download():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("moe_vit_nano_patch8", pretrained=True, tasks=["cls"])


def test_features_shapes_routing_and_aux_losses():
    model = _nano()
    x = torch.randn(2, 3, 64, 64)
    tokens, routing = model.forward_tokens(x, "det", return_routing=True)
    assert tokens.shape == (2, 1 + 64, 96)
    assert [r.layer for r in routing] == list(model.moe_layers()) == ["blocks.1.mlp", "blocks.3.mlp"]
    assert all(r.task == "det" for r in routing)
    _, maps = model.forward_intermediates(x, "det", indices=[1, 3])
    assert [tuple(m.shape) for m in maps] == [(2, 96, 8, 8)] * 2
    ms = model.forward_multiscale(x, "seg")
    assert [m.shape[-1] for m in ms] == [16, 8, 4, 2]
    aux = model.aux_losses(routing)
    assert torch.isfinite(aux.total)
    # Another image size divisible by the patch works (position embedding resampled).
    assert model.forward_tokens(torch.randn(1, 3, 48, 80), "cls").shape == (1, 1 + 6 * 10, 96)


def test_task_conditioning_changes_features():
    model = _nano()
    with torch.no_grad():
        model.task_embed["det"].normal_()
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(model.forward_tokens(x, "cls"), model.forward_tokens(x, "det"))


def test_attention_experts_in_backbone_train():
    model = timm.create_model("moe_vit_nano_patch8", tasks=TASKS, moe={"attn_blocks": "all", "attn_top_k": 3,
                                                                        "num_experts": 4})
    tokens, routing = model.forward_tokens(torch.randn(2, 3, 32, 32), "cls", return_routing=True)
    assert len(routing) == 4 + 2  # 4 attention-expert layers, 2 MoE MLPs
    (tokens.mean() + model.aux_losses(routing).total).backward()
    assert model.blocks[0].attn.q_experts.weight.grad is not None


def test_bad_inputs_have_clear_errors():
    model = _nano()
    with pytest.raises(KeyError, match=r"unknown task 'depth'; this model knows tasks \['cls', 'det', 'seg'\]"):
        model.forward_tokens(torch.randn(1, 3, 64, 64), "depth")
    with pytest.raises(ValueError, match=r"image size 60x64 is not divisible by patch size 8"):
        model.forward_tokens(torch.randn(1, 3, 60, 64), "cls")
    with pytest.raises(ValueError, match="granularity"):
        timm.create_model("moe_vit_nano_patch8", tasks=TASKS, moe={"granularity": 5})
    with pytest.raises(ValueError, match="unknown MoE option"):
        timm.create_model("moe_vit_nano_patch8", tasks=TASKS, moe={"experts": 4})


def test_save_load_roundtrip_identical(tmp_path):
    model = _nano(moe={"num_experts": 4, "granularity": 2})
    x = torch.randn(2, 3, 64, 64)
    path = save_model(model, tmp_path / "m.safetensors")
    again = load_model(path).eval()
    assert again.config == model.config
    assert torch.equal(model.forward_tokens(x, "seg"), again.forward_tokens(x, "seg"))
    assert not list(tmp_path.glob(".*.tmp"))


def test_expert_count_mismatch_and_corrupt_checkpoint(tmp_path):
    path = save_model(_nano(moe={"num_experts": 4}), tmp_path / "m4.safetensors")
    with pytest.raises(ValueError, match=r"holds 4 experts.*expects 8.*moe.num_experts"):
        load_weights(_nano(moe={"num_experts": 8}), path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=f"checkpoint {bad} is not a readable safetensors file"):
        load_model(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def _dense_vit():
    return timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=0, global_pool="token").eval()


@pytest.mark.parametrize("moe", [{"num_experts": 4, "top_k": 2}, {"num_experts": 8, "top_k": 4, "granularity": 4},
                                 {"num_experts": 4, "top_k": 1, "mlp_blocks": "all", "router_mode": "shared"}])
def test_upcycling_reproduces_dense_features_for_every_task(tmp_path, moe):
    dense = _dense_vit()
    with torch.no_grad():  # non-trivial biases so bias handling is exercised
        for n, p in dense.named_parameters():
            if n.endswith("bias"):
                p.normal_(std=0.1)
    path = tmp_path / "dense.pth"
    torch.save({"model": dense.state_dict()}, path)
    model = upcycle_from_dense(_nano(moe=moe), path).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = dense.forward_features(x)
    for task in TASKS:
        torch.testing.assert_close(model.forward_tokens(x, task), ref, atol=1e-5, rtol=1e-5)


def test_upcycling_from_safetensors_and_mismatch(tmp_path):
    from safetensors.torch import save_file
    dense = _dense_vit()
    p = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(p))
    upcycle_from_dense(_nano(), p)
    wide = timm.create_model("moe_vit_nano_patch8", tasks=TASKS, embed_dim=120, num_heads=3)
    with pytest.raises(ValueError, match=r"shape .* expects"):
        upcycle_from_dense(wide, p)


def test_torchvision_mismatch_gives_one_clear_error():
    def broken(name):
        raise RuntimeError("operator torchvision::nms does not exist")

    with pytest.raises(ImportError, match=r"torchvision .* cannot load its compiled ops against torch .*reinstall"):
        check_torchvision(import_module=broken)

    def missing(name):
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    with pytest.raises(ImportError, match="needs torchvision"):
        check_torchvision(import_module=missing)
    check_torchvision()  # the real install is consistent


def test_conv_stem_builds_trains_and_refuses_upcycling(tmp_path):
    model = timm.create_model("moe_vit_nano_patch8", tasks=["cls"], stem="conv")
    tokens = model.forward_tokens(torch.randn(2, 3, 64, 64), "cls")
    assert tokens.shape == (2, 65, 96)
    tokens.mean().backward()
    assert model.patch_embed.stem[0].weight.grad is not None
    with pytest.raises(ValueError, match="stem="):
        timm.create_model("moe_vit_nano_patch8", tasks=["cls"], stem="hybrid")
    with pytest.raises(ValueError, match=r"dense checkpoint .* has no 'patch_embed"):
        upcycle_from_dense(model, _dense_vit().state_dict())


def test_grad_checkpointing_gives_same_gradients():
    model = _nano(moe={"num_experts": 4}).train()
    x = torch.randn(2, 3, 64, 64)
    model.forward_tokens(x, "cls").square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.grad_checkpointing = True
    model.forward_tokens(x, "cls").square().mean().backward()
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n])
