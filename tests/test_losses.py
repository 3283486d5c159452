"""Segmentation losses (spec B §5.3) against values written out by hand."""

import math

import pytest
import torch

from service.train.losses import dice_loss, focal_loss, segmentation_loss


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    # probs (1, 2, 1, 2): pixel a = (normal 0.8, anomalous 0.2) with gt 0; pixel b = (0.3, 0.7) with gt 1
    probs = torch.tensor([[[[0.8, 0.3]], [[0.2, 0.7]]]], dtype=torch.float64)
    target = torch.tensor([[[0, 1]]], dtype=torch.float64)
    return probs, target


def test_focal_tiny_case_by_hand():
    probs, target = _tiny()
    # one-hot clamped to [1e-5, 1 - 1e-5]: pixel a -> (1 - 1e-5, 1e-5), pixel b -> (1e-5, 1 - 1e-5)
    pt_a = (1 - 1e-5) * 0.8 + 1e-5 * 0.2 + 1e-5  # = 0.800004
    pt_b = 1e-5 * 0.3 + (1 - 1e-5) * 0.7 + 1e-5  # = 0.700006
    expected = (-((1 - pt_a) ** 2) * math.log(pt_a) - (1 - pt_b) ** 2 * math.log(pt_b)) / 2
    assert abs(pt_a - 0.800004) < 1e-12 and abs(pt_b - 0.700006) < 1e-12
    assert focal_loss(probs, target).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.020513, abs=1e-5)  # 0.5 * (0.04 * 0.223144 + 0.09 * 0.356675)
    # gamma = 0 is the plain mean negative log-likelihood of the smoothed pt
    assert focal_loss(probs, target, gamma=0.0).item() == pytest.approx(
        -(math.log(pt_a) + math.log(pt_b)) / 2, abs=1e-12
    )


def test_dice_tiny_case_by_hand():
    probs, target = _tiny()
    # anomalous channel (0.2, 0.7) vs gt (0, 1): d = (2*0.7 + 1) / (0.9 + 1 + 1) = 2.4 / 2.9
    assert dice_loss(probs[:, 1], target).item() == pytest.approx(1 - 2.4 / 2.9, abs=1e-12)
    # normal channel (0.8, 0.3) vs 1 - gt (1, 0): d = (2*0.8 + 1) / (1.1 + 1 + 1) = 2.6 / 3.1
    assert dice_loss(probs[:, 0], 1 - target).item() == pytest.approx(1 - 2.6 / 3.1, abs=1e-12)


def test_segmentation_loss_is_sum_of_three_terms():
    probs, target = _tiny()
    pt_a, pt_b = 0.800004, 0.700006
    focal = (-((1 - pt_a) ** 2) * math.log(pt_a) - (1 - pt_b) ** 2 * math.log(pt_b)) / 2
    expected = focal + (1 - 2.4 / 2.9) + (1 - 2.6 / 3.1)
    assert segmentation_loss(probs, target).item() == pytest.approx(expected, abs=1e-9)


def test_dice_is_per_sample_mean_not_pooled():
    prob = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]], dtype=torch.float64)  # (2, 1, 2)
    gt = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    # per sample: d0 = (2*1 + 1) / (2 + 1 + 1) = 0.75, d1 = (0 + 1) / (0 + 1 + 1) = 0.5 -> loss 1 - 0.625 = 0.375
    # (pooled over the batch it would be 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4)
    assert dice_loss(prob, gt).item() == pytest.approx(0.375, abs=1e-12)


def test_perfect_prediction_has_zero_loss():
    target = torch.tensor([[[0, 1], [1, 0]]])
    probs = torch.stack([1 - target, target], dim=1).double()  # (1, 2, 2, 2), exactly the one-hot target
    # focal: pt = (1 - 1e-5) * 1 + 1e-5 * 0 + 1e-5 = 1 -> -(0)^2 * log(1) = 0; dice: (2s + 1) / (2s + 1) = 1
    assert segmentation_loss(probs, target).item() == pytest.approx(0.0, abs=1e-12)


def test_gradients_reach_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, 4, requires_grad=True)
    target = (torch.rand(3, 5, 4) > 0.7).float()
    loss = segmentation_loss(logits.softmax(dim=1), target)
    loss.backward()
    assert loss.dim() == 0 and loss.item() > 0
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_batch_of_one_keeps_its_batch_dim():
    probs, target = _tiny()  # B = 1
    single = segmentation_loss(probs, target)
    doubled = segmentation_loss(torch.cat([probs, probs]), torch.cat([target, target]))
    assert single.item() == pytest.approx(doubled.item(), abs=1e-12)  # per-sample means of equal samples
    with pytest.raises(ValueError, match="squeezed"):
        segmentation_loss(probs, target.squeeze())  # (2,): the reference's gt.squeeze() bug
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        focal_loss(probs[:, :1], target)
    with pytest.raises(ValueError, match="only 0 and 1"):
        segmentation_loss(probs, target * 0.5)
    with pytest.raises(ValueError, match="same"):
        dice_loss(probs[0, 1], target)
