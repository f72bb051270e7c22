"""Feature fusion (paper Eq. 1-3): exact pixels, orientation, batch, order, gradients, loss."""

import pytest
import torch
import torch.nn.functional as F

from nucseg_d2.modeling import fusion as fusion_module
from nucseg_d2.modeling.fusion import FeatureFusion, fusion_loss, paste_mask_logits

HEIGHT, WIDTH = 20, 30  # not square, so a height/width swap moves pixels
TALL_BOX = (5.0, 2.0, 9.0, 14.0)  # x0, y0, x1, y1: columns 5..8, rows 2..13
WIDE_BOX = (2.0, 14.0, 26.0, 18.0)  # columns 2..25, rows 14..17


def _fusion(in_channels=3):
    torch.manual_seed(0)
    module = FeatureFusion(in_channels=in_channels, in_stride=4)
    # A visible F_0 (the default init is near 0, like the mask logits we compare with).
    torch.nn.init.normal_(module.predictor.weight, std=1.0)
    torch.nn.init.normal_(module.predictor.bias, std=1.0)
    return module


def _p2(batch=1, channels=3, requires_grad=False):
    torch.manual_seed(1)
    # ceil(20 / 4) x ceil(30 / 4): the upsampled map (20 x 32) is cropped to 20 x 30.
    return torch.randn(batch, channels, 5, 8, requires_grad=requires_grad)


def _pixel_set(rows, cols):
    return {(r, c) for r in rows for c in cols}


def _changed_pixels(fused, initial):
    changed = (fused != initial).any(dim=0).nonzero().tolist()
    return {tuple(p) for p in changed}


def test_initial_map_is_nearest_upsampled_conv_of_p2_cropped_to_the_image():
    module = _fusion()
    p2 = _p2()
    initial = module.initial_map(p2, (HEIGHT, WIDTH))
    assert initial.shape == (1, 2, HEIGHT, WIDTH)
    per_cell = module.predictor(p2)
    for y, x in [(0, 0), (3, 3), (4, 4), (19, 29), (7, 13)]:
        torch.testing.assert_close(initial[0, :, y, x], per_cell[0, :, y // 4, x // 4])


def test_3x3_initial_map_convolves_the_x4_nearest_upsampled_p2():
    """Paper Sec. 3.1 / docs/MODEL.md: P2 is upsampled x4 (nearest) and THEN convolved to 2 channels.
    A 3x3 conv does not commute with upsampling: at each cell border the window straddles two cells."""
    torch.manual_seed(0)
    module = FeatureFusion(in_channels=3, in_stride=4, kernel_size=3)
    torch.nn.init.normal_(module.predictor.weight, std=1.0)  # visible, unlike the std 0.001 init
    torch.nn.init.normal_(module.predictor.bias, std=1.0)
    p2 = _p2()
    with torch.no_grad():
        initial = module.initial_map(p2, (HEIGHT, WIDTH))
        # Nearest x4 written out as repeats (each P2 cell -> a 4x4 block), not F.interpolate.
        upsampled = p2.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
        assert upsampled.shape[-2:] == (20, 32)
        # Zero-padded 3x3 conv over the whole 20 x 32 map, then cropped to the 20 x 30 image:
        # column 29's window reads column 30 of the upsampled P2, not padding.
        expected = F.conv2d(upsampled, module.predictor.weight, module.predictor.bias, padding=1)[..., :HEIGHT, :WIDTH]
        swapped = F.conv2d(p2, module.predictor.weight, module.predictor.bias, padding=1)
        swapped = swapped.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)[..., :HEIGHT, :WIDTH]
    assert initial.shape == (1, 2, HEIGHT, WIDTH)
    torch.testing.assert_close(initial, expected)
    # The opposite order is a different map, so the comparison above can tell them apart.
    assert (swapped - expected).abs().max() > 0.1


def test_tall_and_wide_boxes_replace_exactly_their_pixels():
    module = _fusion()
    p2 = _p2()
    initial = module.initial_map(p2, (HEIGHT, WIDTH))[0]
    masks = torch.stack([torch.full((28, 28), 3.0), torch.full((28, 28), -2.0)])
    boxes = torch.tensor([TALL_BOX, WIDE_BOX])
    fused = module(p2, [masks], [boxes], (HEIGHT, WIDTH))[0]

    tall = _pixel_set(range(2, 14), range(5, 9))
    wide = _pixel_set(range(14, 18), range(2, 26))
    assert _changed_pixels(fused, initial) == tall | wide
    rows, cols = zip(*tall)
    assert torch.all(fused[1, rows, cols] == 3.0) and torch.all(fused[0, rows, cols] == 0.0)
    rows, cols = zip(*wide)
    assert torch.all(fused[1, rows, cols] == -2.0) and torch.all(fused[0, rows, cols] == 0.0)


def test_pixel_is_covered_when_its_centre_is_inside_a_fractional_box():
    masks = torch.ones(1, 28, 28)
    # Centres c + 0.5 in [4.6, 9.5) -> columns 5..8; r + 0.5 in [2.4, 14.5) -> rows 2..13.
    _, covered = paste_mask_logits(masks, torch.tensor([[4.6, 2.4, 9.5, 14.5]]), HEIGHT, WIDTH)
    assert {tuple(p) for p in covered.nonzero().tolist()} == _pixel_set(range(2, 14), range(5, 9))
    # Boxes reaching outside the map are clipped to it.
    _, covered = paste_mask_logits(masks, torch.tensor([[-3.0, 17.0, 4.0, 25.0]]), HEIGHT, WIDTH)
    assert {tuple(p) for p in covered.nonzero().tolist()} == _pixel_set(range(17, 20), range(0, 4))


def test_mask_rows_go_to_image_rows_and_columns_to_columns():
    # Hand-worked bilinear resize (pixel centres, border-clamped) of a 2x2 mask.
    mask = torch.tensor([[[0.0, 4.0], [8.0, 12.0]]])
    # Wide 4x2 box: rows land on mask rows, columns interpolate 0 -> 4 at u = 0, .25, .75, 1.
    pasted, _ = paste_mask_logits(mask, torch.tensor([[10.0, 3.0, 14.0, 5.0]]), HEIGHT, WIDTH)
    torch.testing.assert_close(pasted[3:5, 10:14], torch.tensor([[0.0, 1, 3, 4], [8, 9, 11, 12]]))
    # Tall 2x4 box: columns land on mask columns, rows interpolate 0 -> 8.
    pasted, _ = paste_mask_logits(mask, torch.tensor([[20.0, 1.0, 22.0, 5.0]]), HEIGHT, WIDTH)
    torch.testing.assert_close(pasted[1:5, 20:22], torch.tensor([[0.0, 4], [2, 6], [6, 10], [8, 12]]))


def test_every_image_of_the_batch_is_fused():
    module = _fusion()
    p2 = _p2(batch=2)
    initial = module.initial_map(p2, (HEIGHT, WIDTH))
    masks = [torch.zeros(0, 28, 28), torch.full((1, 28, 28), 5.0)]
    boxes = [torch.zeros(0, 4), torch.tensor([WIDE_BOX])]
    fused = module(p2, masks, boxes, (HEIGHT, WIDTH))
    torch.testing.assert_close(fused[0], initial[0])
    assert _changed_pixels(fused[1], initial[1]) == _pixel_set(range(14, 18), range(2, 26))
    # And each image uses its own ROIs, not the first image's.
    masks = [torch.full((1, 28, 28), -5.0), torch.full((1, 28, 28), 5.0)]
    boxes = [torch.tensor([TALL_BOX]), torch.tensor([WIDE_BOX])]
    fused = module(p2, masks, boxes, (HEIGHT, WIDTH))
    assert _changed_pixels(fused[0], initial[0]) == _pixel_set(range(2, 14), range(5, 9))
    assert _changed_pixels(fused[1], initial[1]) == _pixel_set(range(14, 18), range(2, 26))
    assert fused[0, 1, 5, 6] == -5.0 and fused[1, 1, 15, 6] == 5.0


def test_later_roi_overwrites_earlier_where_boxes_overlap():
    masks = torch.stack([torch.full((28, 28), 1.0), torch.full((28, 28), 2.0), torch.full((28, 28), 3.0)])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [8.0, 0.0, 12.0, 20.0]])
    pasted, covered = paste_mask_logits(masks, boxes, HEIGHT, WIDTH)
    assert pasted[2, 2] == 1.0 and pasted[7, 6] == 2.0 and pasted[12, 12] == 2.0
    assert torch.all(pasted[:, 8:12] == 3.0)  # the last ROI spans every row at columns 8..11
    assert not covered[17, 3] and not covered[2, 14]
    # Reversing the order reverses who wins.
    pasted, _ = paste_mask_logits(masks.flip(0), boxes.flip(0), HEIGHT, WIDTH)
    assert pasted[7, 6] == 1.0 and pasted[12, 12] == 2.0 and pasted[2, 9] == 1.0


def test_softmax_of_a_pasted_pixel_is_sigmoid_of_the_mask_logit():
    module = _fusion()
    logits = torch.linspace(-4, 4, 28 * 28).view(1, 28, 28)
    p2 = torch.randn(1, 3, 7, 7)
    fused = module(p2, [logits], [torch.tensor([[0.0, 0.0, 28.0, 28.0]])], (28, 28))
    torch.testing.assert_close(F.softmax(fused, dim=1)[0, 1], torch.sigmoid(logits[0]))


def _sequential_reference(initial, masks, boxes):
    """Eq. 2 literally: paste ROI after ROI with grid_sample over the whole map."""
    height, width = initial.shape[-2:]
    fused = initial
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.detach()):
        gx = ((xs - x0) / (x1 - x0) * 2 - 1)[None, :].expand(height, width)
        gy = ((ys - y0) / (y1 - y0) * 2 - 1)[:, None].expand(height, width)
        grid = torch.stack([gx, gy], dim=2)[None]
        values = F.grid_sample(mask[None, None], grid, padding_mode="border", align_corners=False)[0, 0]
        inside = ((xs >= x0) & (xs < x1))[None, :] & ((ys >= y0) & (ys < y1))[:, None]
        fused = torch.stack([torch.where(inside, 0.0, fused[0]), torch.where(inside, values, fused[1])])
    return fused


def test_matches_sequential_grid_sample_replacement_in_values_and_gradients(monkeypatch):
    torch.manual_seed(2)
    module = _fusion()
    count = 40
    corners = torch.rand(count, 2) * torch.tensor([WIDTH, HEIGHT]) - 3
    sizes = torch.rand(count, 2) * 12 + 0.5
    # ROI 0 (columns/rows 4..7) lies inside the last ROI (columns/rows 2..9): completely hidden.
    hidden, cover = torch.tensor([[4.0, 4.0, 8.0, 8.0]]), torch.tensor([[2.0, 2.0, 10.0, 10.0]])
    boxes = torch.cat([hidden, torch.cat([corners, corners + sizes], dim=1), cover])
    masks = torch.randn(count + 2, 7, 7, requires_grad=True)
    p2 = _p2(requires_grad=True)
    initial = module.initial_map(p2, (HEIGHT, WIDTH))[0]
    reference = _sequential_reference(initial, masks, boxes)
    weights = torch.randn_like(reference)
    ref_mask_grad, ref_p2_grad = torch.autograd.grad((reference * weights).sum(), [masks, p2])
    # ROI 0 gets no gradient because later ROIs hide it, not because it is off the map: alone it gets one.
    assert torch.all(ref_mask_grad[0] == 0)
    alone = _sequential_reference(initial.detach(), masks[:1], boxes[:1])
    assert torch.autograd.grad((alone * weights).sum(), masks)[0][0].abs().sum() > 0

    for max_entries in (1 << 22, 7):  # one scatter chunk, then many small ones
        monkeypatch.setattr(fusion_module, "_MAX_SCATTER_ENTRIES", max_entries)
        fused = module(p2, [masks], [boxes], (HEIGHT, WIDTH))[0]
        torch.testing.assert_close(fused, reference)
        mask_grad, p2_grad = torch.autograd.grad((fused * weights).sum(), [masks, p2])
        assert torch.all(mask_grad[0] == 0)  # the hidden ROI
        torch.testing.assert_close(mask_grad, ref_mask_grad)
        torch.testing.assert_close(p2_grad, ref_p2_grad)


def test_gradient_reaches_mask_logits_and_p2_but_not_boxes():
    module = _fusion()
    p2 = _p2(requires_grad=True)
    masks = torch.randn(2, 28, 28, requires_grad=True)
    # The first box covers P2 cells (1..2, 1..2) exactly (pixels 4..11), the tall one none fully.
    boxes = torch.tensor([[4.0, 4.0, 12.0, 12.0], TALL_BOX], requires_grad=True)
    fused = module(p2, [masks], [boxes], (HEIGHT, WIDTH))
    targets = torch.randint(0, 2, (1, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(0))
    fusion_loss(fused, targets, ignore_value=255).backward()

    assert boxes.grad is None
    assert masks.grad[0].abs().sum() > 0 and masks.grad[1].abs().sum() > 0
    p2_grad = p2.grad[0].abs().sum(dim=0)
    replaced = torch.zeros_like(p2_grad, dtype=torch.bool)
    replaced[1:3, 1:3] = True
    assert torch.all(p2_grad[replaced] == 0)  # replaced, not blended
    assert torch.all(p2_grad[~replaced] > 0)
    assert module.predictor.weight.grad.abs().sum() > 0


def test_fully_overwritten_roi_gets_no_gradient():
    masks = torch.randn(2, 14, 14, requires_grad=True)
    boxes = torch.tensor([[4.0, 4.0, 8.0, 8.0], [2.0, 2.0, 10.0, 10.0]])
    pasted, _ = paste_mask_logits(masks, boxes, HEIGHT, WIDTH)
    pasted.sum().backward()
    assert masks.grad[0].abs().sum() == 0 and masks.grad[1].abs().sum() > 0


def test_fusion_loss_ignores_padding():
    fused = torch.randn(2, 2, 6, 8)
    targets = torch.randint(0, 2, (2, 6, 8))
    padded = targets.clone()
    padded[:, :, 5:] = 255
    expected = F.cross_entropy(fused[..., :5].permute(0, 2, 3, 1).reshape(-1, 2), targets[..., :5].reshape(-1))
    torch.testing.assert_close(fusion_loss(fused, padded, 255), expected)
    assert fusion_loss(fused, torch.full_like(targets, 255), 255) == 0
    with pytest.raises(ValueError, match="differ in size"):
        fusion_loss(fused, targets[..., :4], 255)


def test_thousand_rois_on_a_256_crop_fuse_and_pass_gradients_back():
    # A dense Kumar crop's number of positive ROIs; its cost is measured by benchmarks/train_speed.py
    # (Ab1 against the baseline), not timed here.
    module = FeatureFusion(in_channels=64, in_stride=4)
    p2 = torch.randn(2, 64, 64, 64, requires_grad=True)
    torch.manual_seed(4)
    masks, boxes = [], []
    for _ in range(2):
        corners = torch.rand(1000, 2) * 240
        boxes.append(torch.cat([corners, corners + 4 + torch.rand(1000, 2) * 40], dim=1))
        masks.append(torch.randn(1000, 28, 28, requires_grad=True))
    fused = module(p2, masks, boxes, (256, 256))
    fusion_loss(fused, torch.randint(0, 2, (2, 256, 256)), 255).backward()
    assert fused.shape == (2, 2, 256, 256) and torch.isfinite(fused).all()
    assert p2.grad.abs().sum() > 0
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks)


def test_mean_cross_entropy_matches_torch_and_is_zero_when_all_ignored():
    import torch.nn.functional as F

    from nucseg_d2.modeling.losses import mean_cross_entropy

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 5, 6, generator=generator, requires_grad=True)
    targets = torch.randint(0, 2, (2, 5, 6), generator=generator)
    targets[0, :2] = 255
    expected = F.cross_entropy(logits, targets, reduction="mean", ignore_index=255)
    torch.testing.assert_close(mean_cross_entropy(logits, targets, 255), expected)
    everything_ignored = mean_cross_entropy(logits, torch.full_like(targets, 255), 255)
    assert everything_ignored.item() == 0.0
    everything_ignored.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
