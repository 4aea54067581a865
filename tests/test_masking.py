import pytest
import torch

from hf_tgprune.core.masking import (
    apply_masks,
    global_masks,
    load_masks,
    mask_hash,
    prunable_parameters,
    save_masks,
    sparsity_report,
)
from tests.utils import make_model


def _pruned(masks):
    return sum(int((~m).sum()) for m in masks.values())


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.95, 0.98, 0.999])
def test_exact_count_random_scores(sparsity):
    scores = {"a": torch.rand(37, 5), "b": torch.rand(3, 3, 3, 3), "c": torch.rand(101)}
    n = sum(s.numel() for s in scores.values())
    masks = global_masks(scores, sparsity)
    assert _pruned(masks) == round(sparsity * n)
    kept = torch.cat([s[m] for s, m in zip(scores.values(), masks.values())])
    pruned = torch.cat([s[~m] for s, m in zip(scores.values(), masks.values())])
    if kept.numel() and pruned.numel():
        assert pruned.max() <= kept.min()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77, 0.9])
def test_exact_count_with_ties(sparsity):
    # only three distinct values, many ties at any threshold, plus signed zeros and negatives
    g = torch.Generator().manual_seed(1)
    scores = {
        "a": torch.randint(0, 3, (50,), generator=g).float(),
        "b": torch.zeros(40),
        "c": torch.tensor([-0.0, 0.0, -1.0, 2.0] * 5),
    }
    n = sum(s.numel() for s in scores.values())
    masks = global_masks(scores, sparsity)
    assert _pruned(masks) == round(sparsity * n)
    assert global_masks(scores, sparsity)["a"].equal(masks["a"])  # deterministic


def test_all_equal_scores_prune_earliest_first():
    scores = {"a": torch.ones(10), "b": torch.ones(10)}
    masks = global_masks(scores, 0.55)
    assert _pruned(masks) == 11
    assert not masks["a"].any() and (~masks["b"]).sum() == 1 and not masks["b"][0]


def test_min_density_guards_each_layer():
    scores = {"small": torch.rand(100) * 1e-3, "large": torch.rand(1000)}
    collapsed = global_masks(scores, 0.9)
    assert collapsed["small"].sum() == 0
    guarded = global_masks(scores, 0.9, min_density=0.05)
    assert guarded["small"].sum() >= 5
    assert _pruned(guarded) == 990
    with pytest.raises(ValueError, match="min_layer_density"):
        global_masks(scores, 0.9, min_density=0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match="sparsity"):
        global_masks({"a": torch.rand(4)}, bad)


def test_non_finite_scores_name_the_layer():
    with pytest.raises(ValueError, match="layer2.weight"):
        global_masks({"layer1.weight": torch.rand(4), "layer2.weight": torch.tensor([1.0, float("nan")])}, 0.5)


@pytest.mark.parametrize("name", ["timm_resnet", "timm_vit", "hf_resnet", "hf_vit"])
def test_default_prunable_set(name):
    model = make_model(name)
    params = prunable_parameters(model)
    head = {"timm_resnet": "fc.weight", "timm_vit": "head.weight", "hf_resnet": "classifier.1.weight"}.get(
        name, "classifier.weight"
    )
    assert head not in params
    assert all(n.endswith("weight") and p.dim() >= 2 for n, p in params.items())
    conv_or_linear = (torch.nn.Conv2d, torch.nn.Linear)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n.rsplit(".", 1)[0]], conv_or_linear) for n in params)


def test_include_exclude_patterns():
    model = make_model("timm_resnet")
    with_head = prunable_parameters(model, include=[r"\.weight$"])
    assert "fc.weight" in with_head
    without_stem = prunable_parameters(model, exclude=[r"^conv1\."])
    assert without_stem and not any(n.startswith("conv1.") for n in without_stem)
    with pytest.raises(ValueError, match="prune_include.*nothing_here"):
        prunable_parameters(model, include=["nothing_here"])
    with pytest.raises(ValueError, match="prune_exclude"):
        prunable_parameters(model, exclude=["nothing_here"])
    with pytest.raises(ValueError, match="No prunable parameters"):
        prunable_parameters(model, exclude=["."])


def test_apply_report_hash_and_roundtrip(tmp_path):
    model = make_model("hf_resnet")
    params = prunable_parameters(model)
    scores = {n: p.detach().abs() for n, p in params.items()}
    masks = global_masks(scores, 0.8)
    apply_masks(model, masks)
    report = sparsity_report(model, masks)
    n = sum(p.numel() for p in params.values())
    assert report["prunable"]["numel"] == n
    assert report["prunable"]["zeros"] >= round(0.8 * n)
    assert report["total"]["numel"] == sum(p.numel() for p in model.parameters())
    assert 0 < report["total"]["sparsity"] < report["prunable"]["sparsity"]
    save_masks(masks, tmp_path / "m.safetensors")
    loaded = load_masks(tmp_path / "m.safetensors")
    assert mask_hash(loaded) == mask_hash(masks)
    flipped = dict(masks)
    first = next(iter(flipped))
    flipped[first] = masks[first].clone()
    flipped[first].view(-1)[0] ^= True
    assert mask_hash(flipped) != mask_hash(masks)


def test_lamp_normalize_matches_definition():
    from hf_tgprune.core.masking import lamp_normalize

    score = torch.tensor([[3.0, 1.0], [2.0, 0.5]])
    got = lamp_normalize({"w": score})["w"]
    flat = score.reshape(-1)
    expected = torch.stack([flat[i] ** 2 / (flat[flat >= flat[i]] ** 2).sum() for i in range(4)]).reshape(2, 2)
    torch.testing.assert_close(got, expected)
    assert got.max() == 1.0  # every layer's largest score normalises to 1


@pytest.mark.parametrize("allocation", ["global", "lamp", "magnitude", "lamp_magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_select_masks_exact_count_every_allocation(allocation, sparsity):
    from hf_tgprune.core.masking import select_masks

    g = torch.Generator().manual_seed(0)
    weights = {
        "a": torch.randn(40, 30, generator=g),
        "b": torch.randn(8, 4, 3, 3, generator=g) * 5,
        "c": torch.randn(500, generator=g),
    }
    scores = {n: torch.rand(w.shape, generator=g) for n, w in weights.items()}
    masks = select_masks(scores, sparsity, allocation=allocation, weights=weights)
    assert _pruned(masks) == round(sparsity * sum(w.numel() for w in weights.values()))
    if allocation == "lamp":  # the top weight of every layer survives any sparsity
        assert all(bool(m.reshape(-1)[s.reshape(-1).argmax()]) for m, s in zip(masks.values(), scores.values()))


def test_decoupled_allocation_counts_from_magnitude_choice_from_scores():
    from hf_tgprune.core.masking import select_masks

    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(64, generator=g) * 10, "b": torch.randn(64, generator=g)}
    scores = {"a": torch.rand(64, generator=g), "b": torch.rand(64, generator=g)}
    masks = select_masks(scores, 0.75, allocation="magnitude", weights=weights)
    by_magnitude = global_masks({n: w.abs() for n, w in weights.items()}, 0.75)
    for name in weights:
        kept = int(masks[name].sum())
        assert kept == int(by_magnitude[name].sum())  # per-layer count of the magnitude ranking
        top = torch.sort(scores[name], descending=True).indices[:kept]  # the weights chosen by the criterion
        assert bool(masks[name][top].all())


def test_already_zero_weights_are_pruned_first():
    """A student that is already sparse asked for less sparsity loses its zeros first: exactly the target."""
    from hf_tgprune.core.masking import select_masks

    g = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(1000, generator=g), "b": torch.randn(1000, generator=g)}
    weights["a"][:900] = 0  # 85% already zero (90% of layer a, 80% of layer b)
    weights["b"][:800] = 0
    scores = {n: torch.zeros_like(w) for n, w in weights.items()}  # e.g. |θ·g| with g = 0 on the live weights
    masks = select_masks(scores, 0.9, weights=weights)
    assert _pruned(masks) == 1800
    zeros = {n: w == 0 for n, w in weights.items()}
    assert all(bool((~masks[n])[zeros[n]].all()) for n in weights)  # every zero pruned, no live weight lost


# --- masks from outside the library -----------------------------------------------------------------------------------
def test_float_and_int_01_masks_are_accepted_as_bool():
    from hf_tgprune.core.masking import as_bool_masks

    float_mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # as torch.nn.utils.prune stores weight_mask
    masks = as_bool_masks({"a": float_mask, "b": torch.tensor([1, 0, 1]), "c": torch.tensor([True, False])})
    assert all(mask.dtype == torch.bool for mask in masks.values())
    assert torch.equal(masks["a"], float_mask.bool()) and masks["b"].tolist() == [True, False, True]

    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    returned = apply_masks(model, {"0.weight": float_mask})
    assert returned["0.weight"].dtype == torch.bool
    assert torch.count_nonzero(model[0].weight[~float_mask.bool()]) == 0


@pytest.mark.parametrize("bad", [torch.tensor([0.5, 1.0]), torch.tensor([2, 0]), torch.tensor([-1.0, 1.0])])
def test_masks_with_values_other_than_0_and_1_are_refused(bad):
    from hf_tgprune.core.masking import as_bool_masks

    with pytest.raises(ValueError, match=r"`masks\['w'\]`.*values other than 0 and 1"):
        as_bool_masks({"w": bad})
    with pytest.raises(TypeError, match="must be a tensor"):
        as_bool_masks({"w": [1, 0]})


def test_non_finite_scores_point_to_the_weights_and_the_likely_cause():
    scores = {"a.weight": torch.tensor([float("nan")]), "b.weight": torch.tensor([float("nan")])}
    with pytest.raises(ValueError, match=r"'a.weight' and 1 more.*non_finite_parameters.*corrupted"):
        global_masks(scores, 0.5)
