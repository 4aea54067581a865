import copy

import pytest
import torch
import torch.nn.functional as F

from hf_tgprune.core.masking import prunable_parameters
from hf_tgprune.core.scoring import ScoringOptions, compute_importance_scores
from tests.utils import RandomImages, make_model


def _batches(n_batches=3, batch_size=6, seed=0):
    data = RandomImages(n_batches * batch_size, seed=seed)
    return [
        {"pixel_values": data.pixel_values[i : i + batch_size], "labels": data.labels[i : i + batch_size]}
        for i in range(0, len(data), batch_size)
    ]


def _independent_scores(student, teacher, batches, alpha, beta, T, aggregation, criterion="wg", train_bn=False):
    """|θ·∂L/∂θ| written out from scratch with loss.backward() and F.kl_div. `train_bn`: BatchNorm layers normalise
    with batch statistics (on a copy of the student, whose running statistics that changes)."""
    student.eval()
    if train_bn:
        student = copy.deepcopy(student)
        for module in student.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.train()
    names = list(prunable_parameters(student))
    params = dict(student.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for batch in batches:
        student.zero_grad()
        zs = student(batch["pixel_values"])
        zs = zs.logits if hasattr(zs, "logits") else zs
        with torch.no_grad():
            zt = teacher(batch["pixel_values"])
            zt = zt.logits if hasattr(zt, "logits") else zt
        log_ps, log_pt = F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1)
        kl_s_t = F.kl_div(log_pt, log_ps, log_target=True, reduction="batchmean")
        kl_t_s = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
        loss = alpha * T**2 * (beta * kl_s_t + (1 - beta) * kl_t_s) + (1 - alpha) * F.cross_entropy(
            zs, batch["labels"]
        )
        loss.backward()
        for n in names:
            if criterion == "fisher":  # θ²·g² summed over batches
                total[n] += (params[n].detach() * params[n].grad) ** 2
                continue
            if criterion == "taylor":  # −θ·g + ½·b·θ²·g², summed over batches of b images
                w, g = params[n].detach(), params[n].grad
                total[n] += -w * g + 0.5 * len(batch["labels"]) * w**2 * g**2
                continue
            s = (params[n].grad if criterion == "g" else params[n].detach() * params[n].grad).abs()
            total[n] = 0.9 * total[n] + 0.1 * s if aggregation == "ema" else total[n] + s
    if aggregation == "ema":
        total = {n: t / (1 - 0.9 ** len(batches)) for n, t in total.items()}
    student.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("aggregation", ["ema", "sum"])
@pytest.mark.parametrize(
    "method,alpha,criterion", [("tgp", 0.7, "wg"), ("snip", 0.0, "wg"), ("grad", 0.7, "g"), ("tgp", 1.0, "wg")]
)
def test_scores_match_independent_autograd(aggregation, method, alpha, criterion):
    student, teacher = make_model("timm_resnet", seed=0), make_model("hf_resnet", seed=1)
    batches = _batches()
    got = compute_importance_scores(
        student,
        batches,
        method=method,
        teacher=teacher,
        options=ScoringOptions(alpha=alpha, beta=0.5, temperature=3.0),
        aggregation=aggregation,
    )
    expected = _independent_scores(student, teacher, batches, alpha, 0.5, 3.0, aggregation, criterion)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["timm_resnet", "hf_resnet", "timm_vit"])
def test_scoring_changes_no_parameter_buffer_or_module_mode(name, bn_mode):
    student, teacher = make_model(name), make_model("timm_resnet", seed=3)
    student.train()
    modules = list(student.modules())
    modules[len(modules) // 2].eval()  # a frozen part (e.g. frozen BatchNorm) keeps its own mode
    modes = [module.training for module in modules]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    compute_importance_scores(student, _batches(), method="tgp", teacher=teacher, bn_mode=bn_mode)
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics included
    assert all(p.grad is None for p in student.parameters())
    assert [module.training for module in modules] == modes


def test_an_unknown_batchnorm_mode_is_refused_before_scoring():
    student, teacher = make_model("timm_resnet"), make_model("timm_resnet", seed=3)
    with pytest.raises(ValueError, match=r"scoring_bn_mode must be 'eval' or 'train', got 'batch'"):
        compute_importance_scores(student, _batches(), method="tgp", teacher=teacher, bn_mode="batch")


def test_train_bn_mode_scores_with_batch_statistics_and_dropout_off():
    """bn_mode="train": BatchNorm normalises with each batch's statistics (an independent computation with BatchNorm
    in train mode), dropout stays off (two passes give the same scores), and the scores differ from eval mode's."""
    student, teacher = make_model("timm_resnet"), make_model("timm_resnet", seed=3)
    student.fc = torch.nn.Sequential(torch.nn.Dropout(0.5), student.fc)
    batches = _batches()
    options = ScoringOptions(alpha=0.7, beta=0.5, temperature=3.0)
    train = compute_importance_scores(
        student, batches, method="tgp", teacher=teacher, options=options, bn_mode="train"
    )
    again = compute_importance_scores(
        student, batches, method="tgp", teacher=teacher, options=options, bn_mode="train"
    )
    evaluated = compute_importance_scores(student, batches, method="tgp", teacher=teacher, options=options)
    expected = _independent_scores(student, teacher, batches, 0.7, 0.5, 3.0, "ema", train_bn=True)
    for name in expected:
        torch.testing.assert_close(train[name], expected[name], rtol=1e-4, atol=1e-7)
        assert torch.equal(train[name], again[name])
    assert any(not torch.allclose(train[n], evaluated[n], rtol=1e-3) for n in train)


def test_data_free_methods():
    student = make_model("timm_resnet")
    magnitude = compute_importance_scores(student, method="magnitude")
    params = prunable_parameters(student)
    assert all(torch.equal(magnitude[n], params[n].detach().abs()) for n in params)
    r1 = compute_importance_scores(student, method="random", seed=5)
    r2 = compute_importance_scores(student, method="random", seed=5)
    assert all(torch.equal(r1[n], r2[n]) for n in r1)


def test_sharded_gradients_sum_to_the_full_batch():
    """Two shards per batch + a summing all_reduce == one process on the whole batch (eval-mode BN)."""
    student, teacher = make_model("hf_resnet"), make_model("timm_resnet", seed=3)
    batches = _batches(batch_size=6)
    full = compute_importance_scores(student, batches, teacher=teacher)
    # emulate two ranks: run each half, then add their flat contributions as all_reduce would
    halves = [[{k: v[:2] for k, v in b.items()} for b in batches], [{k: v[2:] for k, v in b.items()} for b in batches]]
    contributions = []

    def record(flat):
        contributions.append(flat.clone())
        return flat

    for half in halves:
        compute_importance_scores(student, half, teacher=teacher, all_reduce=record)
    summed = iter([a + b for a, b in zip(contributions[:3], contributions[3:])])
    sharded = compute_importance_scores(student, halves[0], teacher=teacher, all_reduce=lambda flat: next(summed))
    for n in full:
        torch.testing.assert_close(sharded[n], full[n], rtol=1e-4, atol=1e-8)


def test_empty_or_unlabelled_calibration_is_an_error():
    student, teacher = make_model("timm_resnet"), make_model("timm_resnet", seed=3)
    with pytest.raises(ValueError, match="empty"):
        compute_importance_scores(student, [], teacher=teacher)
    with pytest.raises(ValueError, match="labels"):
        compute_importance_scores(student, [{"pixel_values": torch.randn(2, 3, 32, 32)}], teacher=teacher)
    with pytest.raises(ValueError, match="Unknown scoring method"):
        compute_importance_scores(student, _batches(), method="nope")


def test_tgp_fisher_matches_independent_autograd():
    """θ²·Σ_b g_b² with g_b the gradient of the mean teacher-guided loss of batch b, written out with backward()."""
    student, teacher = make_model("timm_resnet", seed=0), make_model("hf_resnet", seed=1)
    batches = _batches()
    teacher.eval()
    expected = _independent_scores(student, teacher, batches, 0.7, 0.5, 3.0, "sum", criterion="fisher")
    # the method sums whatever aggregation the caller asks for: Σ_b, not an EMA
    got = compute_importance_scores(student, batches, method="tgp_fisher", teacher=teacher, aggregation="ema")
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-12)
    # and it differs from the squared first-moment score |θ·Σ g|² whenever the batch gradients disagree
    first = compute_importance_scores(student, batches, method="tgp", teacher=teacher, aggregation="sum")
    assert any(not torch.allclose(got[n], first[n] ** 2, rtol=1e-3) for n in expected)


def test_teacher_with_another_class_count_gives_the_trainers_message():
    student, teacher = make_model("timm_resnet", num_labels=4), make_model("hf_resnet", num_labels=7)
    with pytest.raises(ValueError, match=r"disagree on the number of labels \(7 vs 4\)"):
        compute_importance_scores(student, _batches(), method="tgp", teacher=teacher)


def test_train_mode_scoring_of_a_single_image_batch_uses_running_statistics():
    student, teacher = make_model("timm_resnet"), make_model("timm_resnet", seed=3)
    batches = _batches(n_batches=2, batch_size=4) + [{k: v[:1] for k, v in _batches(1, 1, seed=5)[0].items()}]
    scores = compute_importance_scores(student, batches, method="tgp", teacher=teacher, bn_mode="train")
    assert all(torch.isfinite(s).all() for s in scores.values())


@pytest.mark.parametrize("alpha", [0.7, 0.0])
def test_signed_taylor_scores_match_independent_autograd(alpha):
    """`tgp_taylor`: Σ_b (−θ·g_b + ½·n_b·θ²·g_b²), signed, against loss.backward() batch by batch (uneven batches)."""
    student, teacher = make_model("timm_resnet", seed=0), make_model("hf_resnet", seed=1)
    batches = _batches(n_batches=2, batch_size=6) + _batches(n_batches=1, batch_size=4, seed=3)
    got = compute_importance_scores(
        student, batches, method="tgp_taylor", teacher=teacher, options=ScoringOptions(alpha=alpha)
    )
    expected = _independent_scores(student, teacher, batches, alpha, 0.5, 3.0, "sum", "taylor")
    assert any(bool((score < 0).any()) for score in got.values())  # signed: removing some weights lowers the loss
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


def test_teacher_memo_reuses_the_teachers_logits_only_for_the_same_images():
    """A `TeacherLogitMemo` runs the teacher once per batch position and reuses its logits on a later pass only where
    the pixel values are equal: the scores are those of a pass without the memo (exact), and a changed image (a random
    transform) runs the teacher again."""
    from hf_tgprune.core.scoring import TeacherLogitMemo

    student, teacher = make_model("timm_resnet", seed=0), make_model("hf_resnet", seed=1)
    forwards = []
    teacher.register_forward_hook(lambda *_: forwards.append(1))
    batches = _batches()
    memo = TeacherLogitMemo()

    def scores(batches, memo=None):
        return compute_importance_scores(student, batches, method="tgp_fisher", teacher=teacher, teacher_memo=memo)

    def assert_equal(a, b):
        assert all(torch.equal(a[n], b[n]) for n in a)

    assert_equal(scores(batches, memo), scores(batches))
    assert (len(forwards), memo.forwards) == (6, 3)  # 3 with the memo, 3 without
    with torch.no_grad():  # the next round scores another student (a pruned one) on the same images
        next(iter(prunable_parameters(student).values())).mul_(0.5)
    forwards.clear()
    assert_equal(scores(batches, memo), scores(batches))
    assert (len(forwards), memo.forwards) == (3, 3)  # the memo ran no teacher forward
    changed = [batches[0], {**batches[1], "pixel_values": batches[1]["pixel_values"].flip(-1)}, batches[2]]
    forwards.clear()
    assert_equal(scores(changed, memo), scores(changed))
    assert (len(forwards), memo.forwards) == (4, 4)  # the flipped batch ran the teacher again
    # the logits do come from the memo: with another teacher the memo's scores stay the first teacher's
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(-1)
    memorised = scores(changed, memo)
    assert memo.forwards == 4 and any(not torch.equal(memorised[n], s) for n, s in scores(changed).items())
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(-1)
    # images refilled in place are new images: the memo kept a copy of the old ones, so the teacher runs again
    batches[2]["pixel_values"].mul_(-1)
    assert_equal(scores(batches, memo), scores(batches))
    assert memo.forwards == 6  # batches 1 (unflipped again) and 2 (refilled)
    # a teacher that shares the student's weights changes with its masks: it always runs
    shared = TeacherLogitMemo()
    compute_importance_scores(student, batches, method="tgp_fisher", teacher=student, teacher_memo=shared)
    assert shared.forwards == 0 and not shared.entries
