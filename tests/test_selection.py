"""Selection: counts, the SAM score against a dense computation, fisher, global scope, random, magnitude, bitfit."""

import pytest
import torch
from conftest import make_batches, tiny_bert
from peft import get_peft_model

import peft_sam
from peft_sam import SAMConfig, SAMLayer
from peft_sam.tuners.sam.mask_functions import find_candidates


def _dense_scores(method: str, batches, clip: float = 1.0) -> dict[str, torch.Tensor]:
    """Reference: plain model, per-batch gradient clipped over all parameters, summed with sign (or squared)."""
    model = tiny_bert(0)
    model.train()
    torch.manual_seed(123)
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
        coef = min(1.0, clip / (float(norm) + 1e-6))
        for n, p in model.named_parameters():
            g = p.grad.double() * coef
            sums[n] += g if method == "sam" else g * g
    return {n: (s.abs() if method == "sam" else s) for n, s in sums.items()}


def _selected(model) -> dict[str, torch.Tensor]:
    chosen = {}
    for c in find_candidates(model, "default"):
        found = c.layer.entries("default", c.tensor_name)  # None: no entry chosen in this tensor
        chosen[f"{c.name}.{c.tensor_name}"] = torch.empty(0, dtype=torch.long) if found is None else found[0]
    return chosen


def _calibrate(method: str, scope: str = "per_tensor", p: float = 0.05):
    batches = make_batches(num=4)
    model = get_peft_model(tiny_bert(0), SAMConfig(p=p, selection=method, scope=scope, task_type="SEQ_CLS"))
    torch.manual_seed(123)  # same dropout masks as the reference
    summary = peft_sam.select_parameters(model, batches, show_progress=False)
    return model, summary, batches


@pytest.mark.parametrize("method", ["sam", "fisher"])
def test_per_tensor_selection_matches_dense_reference(method):
    model, summary, batches = _calibrate(method)
    reference = _dense_scores(method, batches)
    chosen = _selected(model)
    assert summary.num_batches == 4 and summary.num_selected == sum(i.numel() for i in chosen.values())
    floor = peft_sam.tuners.sam.mask_functions.STRUCTURAL_ZERO_RTOL * max(float(reference[n].max()) for n in chosen)
    for name, idx in chosen.items():
        score = reference[name].clone()
        if name == "bert.embeddings.word_embeddings.weight":
            score[0] = float("-inf")  # the padding row never gets a gradient
        score = score.reshape(-1)
        k = min(int(0.05 * score.numel()), int((score > floor).sum()))
        assert idx.numel() == k, name
        if k == 0:
            continue
        threshold = torch.topk(score, k).values[-1]
        assert bool((score[idx] >= threshold).all()), f"{name}: a chosen entry is not in the top-{k}"
        assert torch.equal(idx, torch.sort(idx).values)


def test_sam_and_fisher_rank_differently():
    sam = _selected(_calibrate("sam")[0])
    fisher = _selected(_calibrate("fisher")[0])
    assert any(not torch.equal(sam[n], fisher[n]) for n in sam)


def test_global_scope_picks_global_top_k():
    model, summary, batches = _calibrate("sam", scope="global", p=0.02)
    reference = _dense_scores("sam", batches)
    chosen = _selected(model)
    names = list(chosen)
    flat = torch.cat([reference[n].reshape(-1) for n in names])
    k = int(0.02 * flat.numel())
    assert summary.num_selected == k
    threshold = torch.topk(flat, k).values[-1]
    for n in names:
        assert bool((reference[n].reshape(-1)[chosen[n]] >= threshold).all())
    counts = {n: i.numel() for n, i in chosen.items()}
    assert len(set(counts.values())) > 2  # unlike per_tensor, the share differs between tensors


def test_random_is_seeded_and_differs_between_same_shape_layers():
    def pick(seed):
        return _selected(get_peft_model(tiny_bert(0), SAMConfig(p=0.1, selection="random", seed=seed)))

    a, b, c = pick(0), pick(0), pick(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    q = a["bert.encoder.layer.0.attention.self.query.weight"]
    k = a["bert.encoder.layer.0.attention.self.key.weight"]
    assert q.shape == k.shape and not torch.equal(q, k)


def test_magnitude_picks_largest_pretrained_entries():
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.1, selection="magnitude"))
    for cand in find_candidates(model, "default"):
        idx = _selected(model)[f"{cand.name}.{cand.tensor_name}"]
        mags = cand.tensor.detach().abs().reshape(-1)
        if idx.numel():
            rest = torch.ones_like(mags, dtype=torch.bool)
            rest[idx] = False
            assert mags[idx].min() >= (mags[rest].max() if rest.any() else 0)


def test_bitfit_trains_all_biases_and_no_weight():
    model = get_peft_model(tiny_bert(0), SAMConfig(selection="bitfit"))
    assert all(c.tensor_name == "bias" for c in find_candidates(model, "default"))
    for _, module in model.named_modules():
        if isinstance(module, SAMLayer):
            assert module.entries("default", "weight") is None  # no (empty) weight parameter at all
            if getattr(module.get_base_layer(), "bias", None) is not None:
                assert module.entries("default", "bias")[0].numel() == module.get_base_layer().bias.numel()


def test_selection_runs_without_touching_the_trainable_flags_or_the_rng_of_training():
    model = get_peft_model(tiny_bert(0), SAMConfig(p=0.05, task_type="SEQ_CLS"))
    peft_sam.select_parameters(model, make_batches(), show_progress=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(flag == ("sam_" in n or "modules_to_save" in n) for n, flag in flags.items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, SAMLayer))


def test_entries_with_a_gradient_zero_by_construction_are_never_selected():
    # the key bias under softmax attention (its gradient cancels over the keys) and the padding row of the embedding
    model, _, _ = _calibrate("sam")
    chosen = _selected(model)
    key_biases = [n for n in chosen if n.endswith("attention.self.key.bias")]
    assert key_biases and all(chosen[n].numel() == 0 for n in key_biases)
    hidden = model.base_model.model.config.hidden_size
    words = chosen["bert.embeddings.word_embeddings.weight"]
    assert words.numel() > 0 and bool((words >= hidden).all())  # nothing in row 0 (pad_token_id)
    assert all(chosen[n].numel() > 0 for n in chosen if n.endswith("attention.self.query.bias"))
    # data-free selections skip the padding row as well
    drawn = get_peft_model(tiny_bert(0), SAMConfig(p=0.9, selection="random", task_type="SEQ_CLS"))
    assert bool((_selected(drawn)["bert.embeddings.word_embeddings.weight"] >= hidden).all())
