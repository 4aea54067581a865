import pytest
import torch
import torch.nn.functional as F

from hf_tgprune.core.losses import cakld, normalize_logits, self_distillation_loss, teacher_guided_loss


@pytest.mark.parametrize("alpha,beta,T", [(0.7, 0.5, 3.0), (1.0, 0.0, 1.0), (0.3, 1.0, 5.0)])
def test_teacher_guided_loss_matches_kl_div(alpha, beta, T):
    zs, zt = torch.randn(8, 10), torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    log_ps, log_pt = F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1)
    kl_s_t = F.kl_div(log_pt, log_ps, log_target=True, reduction="batchmean")
    kl_t_s = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
    expected = alpha * T**2 * (beta * kl_s_t + (1 - beta) * kl_t_s) + (1 - alpha) * F.cross_entropy(zs, y)
    got = teacher_guided_loss(zs, zt, y, alpha=alpha, beta=beta, temperature=T)
    torch.testing.assert_close(got, expected)


def test_cakld_is_zero_for_identical_logits_and_asymmetric_otherwise():
    z = torch.randn(4, 6)
    assert cakld(z, z).abs() < 1e-6
    zs, zt = torch.randn(4, 6), torch.randn(4, 6)
    assert not torch.allclose(cakld(zs, zt, beta=1.0), cakld(zs, zt, beta=0.0))
    torch.testing.assert_close(cakld(zs, zt, beta=1.0), cakld(zt, zs, beta=0.0))


def test_normalize_before_temperature():
    z = torch.randn(3, 5) * 7 + 2
    n = normalize_logits(z)
    torch.testing.assert_close(n.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.std(-1), torch.ones(3), atol=1e-5, rtol=0)
    # logits that differ by scale and shift are the same after normalisation
    torch.testing.assert_close(cakld(z, 3 * z + 1, normalize=True), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_alpha_zero_is_cross_entropy_without_teacher():
    zs, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    torch.testing.assert_close(teacher_guided_loss(zs, None, y, alpha=0.0), F.cross_entropy(zs, y))
    with pytest.raises(ValueError, match="teacher_logits"):
        teacher_guided_loss(zs, None, y, alpha=0.5)


def test_self_distillation_loss_matches_kl_div():
    z, z2 = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    T, lam = 4.0, 0.5
    kl = F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(z2 / T, -1), log_target=True, reduction="batchmean")
    expected = F.cross_entropy(z, y) + lam * T**2 * kl
    got = self_distillation_loss(z, z2, y, weight=lam, temperature=T)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert z.grad is not None  # the target view is detached, the student is not
