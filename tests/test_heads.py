"""Detection and segmentation heads on hand-made examples: token assignment, denoising masks,
class-wise segmentation, losses on perfect predictions, bad inputs."""
import warnings

import pytest
import torch
from torchvision import tv_tensors

from moe_vision.decoder import QueryDecoder, Queries
from moe_vision.tasks import GeneralistModel, build_task
from moe_vision.tasks.det import assign_tokens, denoising_mask, focal_loss, varifocal_loss


def _grid_centres(n: int) -> torch.Tensor:
    """Centres of an n x n token grid, normalised, row-major."""
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2)


def test_token_whose_centre_lies_in_a_box_is_assigned_to_it():
    centres = _grid_centres(4)  # x, y in {0.125, 0.375, 0.625, 0.875}
    strides = torch.full((16,), 8.0)
    big = torch.tensor([0.6, 0.6, 0.6, 0.6])  # cxcywh: x, y in [0.3, 0.9] -> the 3 x 3 tokens at the bottom right
    small = torch.tensor([0.3, 0.3, 0.2, 0.2])  # x, y in [0.2, 0.4] -> only the token at (0.375, 0.375)
    assigned = assign_tokens(centres, strides, torch.stack([big, small]), (32, 32), radius=0).reshape(4, 4)
    expected = torch.tensor([[-1, -1, -1, -1],
                             [-1, 1, 0, 0],  # (0.375, 0.375) lies in both boxes: the smaller one wins
                             [-1, 0, 0, 0],
                             [-1, 0, 0, 0]])
    assert torch.equal(assigned, expected)


def test_centre_sampling_radius_and_a_box_without_token_centres():
    centres = _grid_centres(4)
    strides = torch.full((16,), 8.0)  # 8 px tokens on a 32 px image
    wide = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    near = assign_tokens(centres, strides, wide, (32, 32), radius=0.6)  # within 4.8 px of the centre
    assert int((near == 0).sum()) == 4  # the 2x2 tokens around the centre, not all 16
    tiny = torch.tensor([[0.26, 0.26, 0.02, 0.02]])  # contains no token centre
    got = assign_tokens(centres, strides, tiny, (32, 32), radius=0)
    assert (got == 0).sum() == 1 and int(got.argmax()) == 5  # the nearest token: centre (0.375, 0.375)
    assert (assign_tokens(centres, strides, torch.zeros(0, 4), (32, 32)) == -1).all()


def test_denoising_mask_keeps_matching_queries_from_seeing_denoising_ones():
    m = denoising_mask(num_dn=2, groups=2, num_queries=3)
    assert m.shape == (7, 7)
    assert not m[4:, :4].any() and m[4:, 4:].all()  # matching -> denoising: blocked
    assert m[0:2, 0:2].all() and not m[0:2, 2:4].any()  # group 0 sees itself, not group 1
    assert m[2:4, 2:4].all() and not m[2:4, 0:2].any()
    assert m[:4, 4:].all()  # denoising queries may read the matching queries


def _targets(B=2, size=32, n=1):
    boxes = torch.tensor([[2.0, 3.0, 20.0, 30.0], [16.0, 16.0, 30.0, 31.0], [0.0, 0.0, 32.0, 32.0]])[:n]
    return [{"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(size, size)),
             "labels": torch.arange(n) % 4, "image_id": torch.tensor(i), "orig_size": torch.tensor([size, size])}
            for i in range(B)]


def _det_model(num_queries=6, **det):
    import timm
    bb = timm.create_model("moe_vit_nano_patch8", tasks=["det"], img_size=32, moe={"num_experts": 4}, stem="conv")
    return GeneralistModel(bb, {"det": {"num_classes": 4, **det}},
                           {"dim": 32, "num_queries": num_queries, "num_layers": 2, "num_heads": 2, "stem_skip": True})


def test_denoising_queries_cannot_change_the_matching_queries_outputs():
    torch.manual_seed(0)
    model = _det_model(denoising_groups=2).train()
    x = torch.randn(2, 3, 32, 32)
    a = model(x, "det", targets=_targets(n=2))
    b = model(x, "det", targets=_targets(n=3))  # other ground truth -> other denoising queries
    assert "denoising" in a and a["denoising"]["num"] == 2 and b["denoising"]["num"] == 3
    torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-6)
    assert not torch.allclose(a["denoising"]["layers"][-1]["boxes"][:, :2], b["denoising"]["layers"][-1]["boxes"][:, :2])
    losses = model.spec("det").total_loss(a, _targets(n=2))
    assert torch.isfinite(losses["loss"]) and losses["denoising"] > 0
    losses["loss"].backward()
    assert model.heads.det.dn_label_embed.weight.grad is not None
    assert "denoising" not in model.eval()(x, "det")  # inference never builds them


def test_det_losses_vanish_for_perfect_predictions():
    spec = build_task("det", {"num_classes": 3})
    gt = torch.tensor([[8.0, 8.0, 24.0, 16.0]])
    target = {"boxes": gt, "labels": torch.tensor([1])}
    logits = torch.full((1, 3, 3), -30.0)
    logits[0, 1, 1] = 30.0  # query 1 is sure it sees class 1, the others see nothing
    boxes = torch.full((1, 3, 4), 0.5)
    boxes[0, 1] = torch.tensor([0.5, 0.375, 0.5, 0.25])  # the box, normalised cxcywh of a 32 x 32 image
    losses = spec.loss({"logits": logits, "boxes": boxes, "image_size": (32, 32)}, [target])
    assert float(losses["l1"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["giou"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["class"]) < 1e-6
    wrong = logits.clone()
    wrong[0, 1] = torch.tensor([30.0, -30.0, -30.0])
    assert float(spec.loss({"logits": wrong, "boxes": boxes, "image_size": (32, 32)}, [target])["class"]) > 1.0


def test_varifocal_and_focal_losses_by_hand():
    logits = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[0.0, 0.6]])
    p = torch.sigmoid(logits)
    neg = 0.75 * p[0, 0] ** 2 * -torch.log(1 - p[0, 0])
    pos = 0.6 * -(0.6 * torch.log(p[0, 1]) + 0.4 * torch.log(1 - p[0, 1]))
    assert float(varifocal_loss(logits, target)) == pytest.approx(float(neg + pos), rel=1e-5)
    hard = torch.tensor([[0.0, 1.0]])
    expected = 0.75 * p[0, 0] ** 2 * -torch.log(1 - p[0, 0]) + 0.25 * (1 - p[0, 1]) ** 2 * -torch.log(p[0, 1])
    assert float(focal_loss(logits, hard)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("n_boxes", [0, 1, 3])
def test_det_training_step_with_no_boxes_border_boxes_and_more_objects_than_queries(n_boxes):
    """Images without boxes, a box touching every border, more objects (3) than queries (2)."""
    model = _det_model(num_queries=2, denoising_groups=1).train()
    targets = _targets(n=n_boxes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(torch.randn(2, 3, 32, 32), "det", targets=targets)
        losses = model.spec("det").total_loss(out, targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    if n_boxes == 3:
        assert any("more objects than queries" in str(w.message) for w in caught)
    preds = model.spec("det").postprocess(model.eval()(torch.randn(2, 3, 32, 32), "det"), targets)
    assert all((p["boxes"] >= 0).all() and (p["boxes"] <= 32).all() for p in preds)


def test_dense_nms_inference_option():
    model = _det_model(inference="dense_nms").eval()
    x = torch.randn(2, 3, 32, 32)
    preds = model.spec("det").postprocess(model(x, "det"), _targets())
    from torchvision.ops import box_iou
    for p in preds:
        assert 0 < len(p["boxes"]) <= 100 and torch.all(p["scores"][:-1] >= p["scores"][1:])
        same = p["labels"][:, None] == p["labels"][None]
        iou = box_iou(p["boxes"], p["boxes"]).masked_fill(torch.eye(len(p["boxes"]), dtype=torch.bool), 0)
        assert float(iou[same].max()) <= 0.6 + 1e-6  # class-wise NMS at nms_iou
    with pytest.raises(ValueError, match=r"det inference='magic'"):
        _det_model(inference="magic")


def test_classwise_seg_loss_is_zero_for_a_perfect_prediction_and_large_when_swapped():
    spec = build_task("seg", {"num_classes": 3})
    gt = torch.zeros(8, 8, dtype=torch.long)
    gt[:, 4:] = 1
    gt[0, 4] = 2
    gt[0, 0] = 255  # ignored
    masks = torch.full((1, 3, 8, 8), -30.0)
    for c in range(3):
        masks[0, c][gt == c] = 30.0
    good = spec.loss({"masks": masks}, [{"mask": gt}])
    assert float(good["ce"]) < 1e-6 and float(good["dice"]) < 0.1
    swapped = spec.loss({"masks": masks[:, [1, 0, 2]]}, [{"mask": gt}])
    assert float(swapped["loss"]) > 10.0
    pred = spec.postprocess({"masks": masks}, [{"mask": gt}])[0]
    assert torch.equal(pred[gt != 255], gt[gt != 255])


def test_classwise_seg_refuses_too_few_queries_and_unknown_labels():
    import timm
    bb = timm.create_model("moe_vit_nano_patch8", tasks=["seg"], img_size=32, moe={"num_experts": 4})
    with pytest.raises(ValueError, match=r"one query per class: decoder.num_queries=4 < num_classes=5"):
        GeneralistModel(bb, {"seg": {"num_classes": 5}}, {"dim": 32, "num_queries": 4, "num_layers": 1,
                                                            "num_heads": 2})
    spec = build_task("seg", {"num_classes": 3})
    gt = torch.zeros(4, 4, dtype=torch.long)
    gt[0, 0] = 7  # a class the head was not built for
    with pytest.raises(ValueError, match=r"segmentation label 7 is outside \[0, num_classes=3\)"):
        spec.loss({"masks": torch.zeros(1, 3, 4, 4)}, [{"mask": gt}])


def test_decoder_refines_reference_boxes_layer_by_layer_and_box_prior_biases_attention():
    dec = QueryDecoder(dim=32, num_queries=3, num_layers=3, num_heads=2, box_prior=2.0)
    memory, pos = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    ref = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.4, 0.4]]])
    seen = []

    def refine(answer, reference):
        seen.append(reference.clone())
        return (reference + 0.05).clamp(max=1.0)
    outs = dec(memory, pos, return_all=True, queries=Queries(torch.randn(1, 2, 32), None, ref, refine),
               centres_M2=_grid_centres(4))
    assert len(outs) == 3 and all(b.shape == (1, 2, 4) for _, b in outs)
    torch.testing.assert_close(seen[1], ref + 0.05)  # layer 2 starts from layer 1's boxes
    bias = dec.box_attention_bias(ref, _grid_centres(4))[0, 0]  # [Q, M]
    assert bias.shape == (2, 16) and float(bias.max()) <= 0
    near = int(((_grid_centres(4) - ref[0, 0, :2]) ** 2).sum(-1).argmin())
    assert int(bias[0].argmax()) == near


def test_pixel_decoder_adds_the_stem_map_to_per_pixel_features_only():
    from moe_vision.decoder import PixelDecoder
    maps = [torch.randn(2, 24, 16 // 2 ** i, 16 // 2 ** i) for i in range(4)]  # strides 4..32 of a 64 px image
    stem = [torch.randn(2, 8, 32, 32), torch.randn(2, 12, 16, 16), torch.randn(2, 16, 8, 8)]  # strides 2, 4, 8
    dec = PixelDecoder(24, 32, stem_channels=(8, 12, 16), finest_stride=4)
    out = dec(maps, stem, image_size=(64, 64))
    assert out.pixel_BDhw.shape == (2, 32, 16, 16) and out.memory_BMD.shape == (2, 16 * 16 + 64 + 16 + 4, 32)
    other_stem = [s.clone() for s in stem]
    other_stem[1] += 1.0  # the stride-4 stem map reaches the per-pixel features; memory is backbone-only
    moved = dec(maps, other_stem, image_size=(64, 64))
    assert not torch.allclose(moved.pixel_BDhw, out.pixel_BDhw) and torch.equal(moved.memory_BMD, out.memory_BMD)
    no_skip = PixelDecoder(24, 32, stem_channels=(), finest_stride=4)
    assert no_skip.stem_lateral is None and no_skip(maps, stem, image_size=(64, 64)).pixel_BDhw.shape == (2, 32, 16, 16)


def test_pixel_decoder_fpn_memory_is_the_fused_levels_and_trains_the_laterals():
    from moe_vision.decoder import PixelDecoder
    torch.manual_seed(0)
    maps = [torch.randn(2, 24, 16 // 2 ** i, 16 // 2 ** i) for i in range(4)]
    dec = PixelDecoder(24, 32, memory="fpn")
    assert dec.memory_proj is None  # no parameters of its own: the memory is the fused maps
    out = dec(maps, image_size=(64, 64))
    lat = [proj(m) for proj, m in zip(dec.lateral, maps)]
    coarse = lat[3] + dec.level_embed[3][:, None, None]  # the coarsest level is its lateral alone
    torch.testing.assert_close(out.memory_BMD[:, -4:], coarse.flatten(2).transpose(1, 2))
    fine = lat[2] + torch.nn.functional.interpolate(lat[3], size=(4, 4), mode="bilinear", align_corners=False)
    fine = fine + dec.level_embed[2][:, None, None]
    torch.testing.assert_close(out.memory_BMD[:, -20:-4], fine.flatten(2).transpose(1, 2))
    out.memory_BMD.sum().backward()  # a loss on the memory alone (MIM's answers) reaches every lateral
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in dec.lateral)
    with pytest.raises(ValueError, match="decoder.memory='pixels'"):
        PixelDecoder(24, 32, memory="pixels")


def test_position_prior_biases_each_mask_query_towards_its_cell_and_leaves_cls_alone():
    from moe_vision.decoder.pixel_decoder import DecoderInputs, sine_embed_points
    from moe_vision.decoder.position_queries import ask_grid, ask_positions
    torch.manual_seed(0)
    centres = _grid_centres(4)
    feats = DecoderInputs(torch.zeros(1, 32, 4, 4), torch.randn(1, 16, 32), torch.randn(1, 16, 32), centres,
                          torch.full((16,), 16.0), [(4, 4)])
    off = QueryDecoder(dim=32, num_queries=3, num_layers=2, num_heads=2)
    on = QueryDecoder(dim=32, num_queries=3, num_layers=2, num_heads=2, position_prior=3.0)
    on.load_state_dict(off.state_dict())  # the prior has no parameters: same weights, other attention
    seen = []
    on.layers[0].cross_attn.register_forward_hook(lambda m, args, out: seen.append(args[3]))
    points = centres[[0, 5]].unsqueeze(0)
    a_off = ask_positions(off, feats, points, (0.25, 0.25), with_cls=True)
    a_on = ask_positions(on, feats, points, (0.25, 0.25), with_cls=True)
    bias = seen[0][0, 0]  # [1 + N, M]
    assert bias.shape == (3, 16) and torch.equal(bias[0], torch.zeros(16))  # the [CLS] query is not biased
    want = -3.0 * ((centres - centres[5]) / 0.25).pow(2).sum(-1)  # adjacent cell: -3
    torch.testing.assert_close(bias[2], want)
    assert not torch.allclose(a_on[:, 1:], a_off[:, 1:])
    # no prior (the default): the answers are those of a decoder called without any bias
    content = torch.cat([off.query_embed[:1], off.query_embed[1:2].expand(2, -1)])[None]
    pos = torch.cat([off.query_pos[:1], sine_embed_points(points[0], 32)])[None]
    direct = off(feats.memory_BMD, feats.memory_pos_BMD, centres_M2=centres, queries=Queries(content, pos))
    torch.testing.assert_close(a_off, direct)
    seen.clear()
    ask_grid(on, feats, (2, 2))  # a 2 x 2 grid of cells: the prior's width is half the image
    torch.testing.assert_close(seen[0][0, 0, 0], -3.0 * ((centres - 0.25) / 0.5).pow(2).sum(-1))
    with pytest.raises(ValueError, match=r"decoder.position_prior=-1.0: expected >= 0"):
        QueryDecoder(dim=32, position_prior=-1.0)
