"""N:M (2:4) masks (hf_tgprune.core.nm): exact density, the pattern, tie-breaking, and preservation through training."""

import pytest
import torch
from torch import nn

from hf_tgprune.core.callbacks import GlobalMaskCallback
from hf_tgprune.core.masking import apply_masks, prunable_parameters
from hf_tgprune.core.nm import is_nm_sparse, nm_incompatible_layers, nm_mask, nm_masks

# one torch thread inside these tests only: the setting is process-wide
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)


def test_keeps_the_top_n_of_every_group_along_the_input_dim():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 3.0, -1.0, 2.0, 0.0], [4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    expected = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(nm_mask(scores, 2, 4), expected)
    assert torch.equal(nm_mask(scores, 1, 4)[0], torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool))


def test_ties_keep_the_lower_index_first():
    assert torch.equal(nm_mask(torch.ones(3, 8), 2, 4), torch.tensor([1, 1, 0, 0] * 2, dtype=torch.bool).repeat(3, 1))
    scores = torch.tensor([[0.5, 0.7, 0.5, 0.5]])  # one clear winner, then a three-way tie for the second place
    assert torch.equal(nm_mask(scores, 2, 4), torch.tensor([[True, True, False, False]]))
    assert torch.equal(nm_mask(scores.flip(-1), 2, 4), torch.tensor([[True, False, True, False]]))


def test_conv_groups_follow_the_flattened_input_layout():
    scores = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)  # (out, in, kh, kw): in*kh*kw = 8
    mask = nm_mask(scores, 2, 4)
    assert mask.shape == scores.shape
    # reshape(out, -1) order: each group of 4 is one input channel's 2x2 kernel; the two largest are its last row
    assert torch.equal(mask.reshape(2, 8), torch.tensor([[0, 0, 1, 1] * 2] * 2, dtype=torch.bool))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_exact_density_and_pattern_per_layer(n, m):
    model = tiny_vit()
    params = prunable_parameters(model)  # patch_embed (in*kh*kw = 3*8*8) and every block Linear
    scores = {name: torch.randn(p.shape) for name, p in params.items()}
    masks = nm_masks(scores, n, m)
    assert masks.keys() == scores.keys()
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert int(mask.sum()) * m == n * mask.numel(), name
        assert is_nm_sparse(mask, n, m, exact=True), name
    apply_masks(model, masks)
    assert all(is_nm_sparse(p, n, m) for p in params.values())


def test_is_nm_sparse_detects_violations():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_nm_sparse(weight, 2, 4)
    assert not is_nm_sparse(weight, 2, 4, exact=True)  # the second group keeps only one
    assert not is_nm_sparse(weight, 1, 4)
    weight[0, 1] = 5.0  # three nonzeros in the first group
    assert not is_nm_sparse(weight, 2, 4)
    assert not is_nm_sparse(torch.zeros(4, 6), 2, 4)  # input dim 6: no 4-group pattern
    assert not is_nm_sparse(torch.zeros(4), 2, 4)


def test_indivisible_layers_are_named():
    scores = {"ok.weight": torch.randn(4, 8), "stem.weight": torch.randn(4, 3, 3, 3), "odd.weight": torch.randn(2, 6)}
    assert nm_incompatible_layers(scores, 4) == ["stem.weight", "odd.weight"]
    with pytest.raises(ValueError, match=r"stem\.weight.*odd\.weight.*prune_exclude"):
        nm_masks(scores)
    with pytest.raises(ValueError, match=r"'stem\.weight' has input dim 27"):
        nm_mask(scores["stem.weight"], name="stem.weight")
    assert list(nm_masks({"ok.weight": scores["ok.weight"]})) == ["ok.weight"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_masks({"w": torch.randn(4, 8)}, n=4, m=4)
    with pytest.raises(ValueError, match="not finite"):
        nm_masks({"w": torch.full((4, 8), float("nan"))})
    with pytest.raises(ValueError, match="at least one layer"):
        nm_masks({})


def test_2_4_pattern_survives_masked_training():
    torch.manual_seed(0)
    model = tiny_vit()
    params = prunable_parameters(model)
    masks = nm_masks({name: p.detach().abs() for name, p in params.items()}, 2, 4)
    apply_masks(model, masks)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))

    def train(steps, callback=None):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        if callback:
            callback.on_train_begin(None, None, None, model=model, optimizer=optimizer)
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if callback:
                callback.on_optimizer_step(None, None, None, optimizer=optimizer)
        if callback:
            callback.on_train_end(None, None, None)

    train(3, GlobalMaskCallback(masks))
    for name, p in params.items():
        assert is_nm_sparse(p, 2, 4), name
        assert torch.equal(p != 0, masks[name]), name  # exactly the mask's weights, none revived, none lost
    train(1)  # without enforcement the pattern breaks: the check above can fail
    assert not all(is_nm_sparse(p, 2, 4) for p in params.values())
