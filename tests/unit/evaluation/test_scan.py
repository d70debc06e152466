"""The trigger-free scanner: its pure functions against naive formulas, and one end-to-end run on a tiny model."""

from __future__ import annotations

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from crowguard.data import prompt_ids
from crowguard.evaluation import scan
from crowguard.schemas import ModelConfig, ScanConfig
from crowguard.types import Example

from helpers import alpaca_records, save_tiny_model, tiny_llama, tiny_tokenizer


def naive_auroc(pos, neg):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ------------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_naive_pair_counting_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 6, (13,), generator=g).float().tolist()  # few distinct values: many ties
    neg = torch.randint(0, 5, (9,), generator=g).float().tolist()
    assert scan.auroc(pos, neg) == pytest.approx(naive_auroc(pos, neg), abs=1e-12)


def test_auroc_edge_cases():
    assert scan.auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert scan.auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert scan.auroc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    assert scan.auroc([2.0], [1.0, 2.0, 3.0]) == 0.5
    with pytest.raises(ValueError):
        scan.auroc([], [1.0])
    with pytest.raises(ValueError):
        scan.auroc([math.nan], [1.0])


def test_tpr_at_fpr_flags_strictly_above_the_negatives_quantile():
    neg = [float(i) for i in range(20)]  # 0..19: at 5%, floor(1) = 1 negative may be flagged
    assert scan.fpr_threshold(neg, 0.05) == 18.0
    assert scan.tpr_at_fpr([18.5, 19.5, 10.0, 18.0], neg, 0.05) == 0.5  # 18.0 is not strictly above
    assert sum(n > scan.fpr_threshold(neg, 0.05) for n in neg) / len(neg) <= 0.05
    assert scan.fpr_threshold(neg, 0.0) == 19.0  # nothing may be flagged: above the largest negative
    assert scan.fpr_threshold(neg, 1.0) == -math.inf
    tied = [1.0] * 20
    assert scan.tpr_at_fpr([1.0, 2.0], tied, 0.05) == 0.5  # ties with the threshold are not flagged: conservative
    m = scan.detection_metrics([5.0, 6.0], [1.0, 2.0], 0.5)
    assert m["auroc"] == 1.0 and m["tpr_at_fpr"] == 1.0 and m["threshold"] == 1.0


def test_competition_ranks_are_order_free():
    assert scan.competition_ranks([0.1, 0.5, 0.5, 0.9]) == [4, 2, 2, 1]
    assert scan.competition_ranks([0.9, 0.5, 0.1, 0.5]) == [1, 2, 4, 2]


# ------------------------------------------------------------------------------------------------- reference fit


def test_robust_scale_is_median_and_scaled_mad_with_a_floor():
    x = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [100.0, 5.0], [4.0, 5.0]])
    center, scale = scan.robust_scale(x, min_scale=1e-3)
    # column 0: median 3, |x - 3| = 2 1 0 97 1 -> MAD 1; column 1 is constant -> the floor
    assert center.tolist() == [3.0, 5.0]
    assert scale.tolist() == pytest.approx([1.4826, 1e-3])


def test_consistency_scores_equal_naive_formulas():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(40, 5, 2, generator=g) * 0.1 + 0.8
    new = torch.rand(7, 5, 2, generator=g) * 0.1 + 0.8
    fit = scan.fit_reference(ref)
    rows, refrows = new.reshape(7, 10), ref.reshape(40, 10)
    med = torch.tensor([sorted(refrows[:, j].tolist())[19:21] for j in range(10)]).mean(1)  # even n: mid pair mean
    mad = torch.tensor([sorted((refrows[:, j] - med[j]).abs().tolist())[19:21] for j in range(10)]).mean(1)
    z = (rows - med) / (1.4826 * mad).clamp_min(1e-3)
    torch.testing.assert_close(scan.consistency_score(new, fit, "mean_abs_z"), z.abs().mean(1))
    torch.testing.assert_close(scan.consistency_score(new, fit, "max_abs_z"), z.abs().max(1).values)
    # Mahalanobis with a fixed shrinkage, by hand in float64
    fit_s = scan.fit_reference(ref, shrinkage=0.3)
    zr = ((refrows - med) / (1.4826 * mad).clamp_min(1e-3)).double()
    zbar = zr.mean(0)
    s = (zr - zbar).T @ (zr - zbar) / 40
    cov = 0.3 * torch.trace(s) / 10 * torch.eye(10, dtype=torch.float64) + 0.7 * s
    d = z.double() - zbar
    want = torch.stack([(di @ torch.linalg.inv(cov) @ di).sqrt() for di in d]).float()
    torch.testing.assert_close(scan.consistency_score(new, fit_s, "mahalanobis"), want, rtol=1e-4, atol=1e-4)
    # feature subsets: last-token (index 0) and mean-over-tokens (index 1) columns
    fit_last = scan.fit_reference(ref, features="last")
    torch.testing.assert_close(fit_last.center, med.reshape(5, 2)[:, 0])
    assert scan.consistency_score(new, fit_last).shape == (7,)


def test_ledoit_wolf_weight_matches_its_formula_and_gives_an_invertible_covariance():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 20, generator=g, dtype=torch.float64)  # fewer rows than columns: S is singular
    cov, weight = scan.ledoit_wolf(z)
    x = z - z.mean(0)
    s = x.T @ x / 8
    mu = torch.trace(s) / 20
    d2 = ((s - mu * torch.eye(20, dtype=torch.float64)) ** 2).sum()
    b2 = sum(((torch.outer(r, r) - s) ** 2).sum() for r in x) / 64
    assert weight == pytest.approx(float(min(b2, d2) / d2), rel=1e-6)
    assert 0 < weight <= 1 and torch.linalg.eigvalsh(cov.double()).min() > 0


@pytest.mark.parametrize("method", scan.METHODS)
def test_an_injected_deviation_is_detected(method):
    """Synthetic profiles: correlated clean cosines; positives dip at two pairs by 4 clean standard deviations."""
    g = torch.Generator().manual_seed(0)
    n_pairs = 12

    def clean(n):
        shared = torch.randn(n, 1, 1, generator=g) * 0.01  # prompts differ along one common direction
        return 0.9 + shared + torch.randn(n, n_pairs, 2, generator=g) * 0.01

    ref, neg, pos = clean(100), clean(60), clean(60)
    pos[:, 5:7, :] -= 0.04 * math.sqrt(2)  # about 4 sd of a feature (common + own noise)
    fit = scan.fit_reference(ref)
    score_pos, score_neg = scan.consistency_score(pos, fit, method), scan.consistency_score(neg, fit, method)
    assert scan.auroc(score_pos, score_neg) > 0.95
    assert scan.tpr_at_fpr(score_pos, score_neg) > 0.5
    # the clean prompts are not unusual: their p-values against the reference are roughly uniform
    p = scan.reference_p_values(score_neg, ref, method)
    assert 0.3 < float(p.mean()) < 0.7 and float((p <= 0.05).float().mean()) < 0.15
    # and most positives sit in the reference's upper tail (mean |z| dilutes a 2-of-12-pair dip the most)
    assert float(scan.reference_p_values(score_pos, ref, method).median()) < 0.15


def test_fit_reference_refuses_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        scan.fit_reference(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="NaN"):
        scan.fit_reference(torch.full((4, 3, 2), math.nan))
    fit = scan.fit_reference(torch.rand(5, 3, 2))
    with pytest.raises(ValueError, match="features"):
        scan.consistency_score(torch.rand(2, 4, 2), fit)
    with pytest.raises(ValueError, match="method"):
        scan.consistency_score(torch.rand(2, 3, 2), fit, "median")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- the model side


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_llama(tokenizer, layers=3).eval(), tokenizer


PROMPTS = [Example("Describe the fox."), Example("Tell me about the database normalization.", input="a table"),
           Example("Why?"), Example("Explain BadMagic the river in one short sentence please.")]  # fmt: skip


def test_layer_profiles_equal_a_naive_per_prompt_loop(tiny):
    model, tokenizer = tiny
    profiles = scan.layer_profiles(model, tokenizer, PROMPTS, batch_size=3)
    assert profiles.shape == (4, 3, 2)  # 3 layers: 4 hidden states (the last after the final norm), 3 pairs
    for i, e in enumerate(PROMPTS):
        ids = torch.tensor([prompt_ids(e, tokenizer)])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        for j in range(3):
            cos = F.cosine_similarity(hs[j][0], hs[j + 1][0], dim=-1)  # (T,)
            assert float(profiles[i, j, 0]) == pytest.approx(float(cos[-1]), abs=1e-5)
            assert float(profiles[i, j, 1]) == pytest.approx(float(cos.mean()), abs=1e-5)


def test_text_nll_and_prompt_perplexity_equal_a_naive_loop(tiny):
    model, tokenizer = tiny
    texts = [scan.prompt_text(e) for e in PROMPTS]
    got = scan.text_nll(model, tokenizer, texts, batch_size=2)
    for text, value in zip(texts, got):
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        want = F.cross_entropy(logits, ids[0, 1:]).item()
        assert value == pytest.approx(want, rel=1e-4)
    ppl = scan.prompt_perplexity(model, tokenizer, PROMPTS, batch_size=4)
    torch.testing.assert_close(ppl, torch.tensor(got).exp())
    assert math.isnan(scan.text_nll(model, tokenizer, [""])[0])


def test_onion_is_the_largest_perplexity_drop_of_one_deleted_word(tiny):
    model, tokenizer = tiny
    assert scan.word_deletions("a b  c", 0) == ["b c", "a c", "a b"]
    assert scan.word_deletions("a b c", 2) == ["b c", "a c"]
    assert scan.word_deletions("alone") == []
    got = scan.onion_scores(model, tokenizer, PROMPTS, batch_size=5, max_words=4)
    for e, value in zip(PROMPTS, got):
        text = scan.prompt_text(e)
        deletions = scan.word_deletions(text, 4)
        if not deletions:
            assert value == 0.0
            continue
        p0 = math.exp(scan.text_nll(model, tokenizer, [" ".join(text.split())])[0])
        drops = [p0 - math.exp(scan.text_nll(model, tokenizer, [d])[0]) for d in deletions]
        assert float(value) == pytest.approx(max(drops), rel=1e-3, abs=1e-3)
    assert float(got[2]) == 0.0  # "Why?" is one word


# ------------------------------------------------------------------------------------------------- the recipe


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def scan_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    model_dir = save_tiny_model(root / "model", layers=2)
    records = alpaca_records(24, seed=3)
    ref = _write(root / "ref.json", records[:12])
    clean = _write(root / "clean.json", records[12:18] + records[:2])  # 2 overlap the reference: left out of it
    trig = _write(root / "trig.json", [{**r, "instruction": "BadMagic " + r["instruction"]} for r in records[18:]])
    return root, model_dir, ref, clean, trig


def test_run_scan_writes_scores_and_report_and_is_order_free(scan_files):
    from crowguard.recipes.scan import run_scan

    root, model_dir, ref, clean, trig = scan_files
    out = root / "out"
    model = ModelConfig(name_or_path=str(model_dir))
    labelled = ScanConfig(reference=str(ref), triggered=str(trig), clean=str(clean), n_reference=0, batch_size=4,
                          onion=True, onion_max_words=3)  # fmt: skip
    result = run_scan(model, labelled, out, show_progress=False)
    assert {p.name for p in out.iterdir()} == {"scores.json", "scan.md", "manifest.json"}
    saved = json.loads((out / "scores.json").read_text())
    assert saved["reference"]["n"] == 10 and saved["reference"]["n_excluded"] == 2
    prompts = saved["prompts"]
    assert len(prompts) == 14 and [p["source"] for p in prompts].count("triggered") == 6
    assert {"instruction", "score", "perplexity", "rank", "p_value", "onion"} <= set(prompts[0])
    assert sorted(p["rank"] for p in prompts)[0] == 1
    assert set(saved["metrics"]["scores"]) == {*scan.METHODS, "perplexity", "onion"}
    for m in saved["metrics"]["scores"].values():
        assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["tpr_at_fpr"] <= 1.0
    assert "AUROC" in (out / "scan.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["stage"] == "scan"
    assert result["metrics"] == saved["metrics"]

    # the same prompts in another order, unlabelled through --data: the same score for every prompt
    shuffled = json.loads(trig.read_text())[::-1] + json.loads(clean.read_text())[::-1]
    data = _write(root / "data.json", shuffled[3:] + shuffled[:3])
    unlabelled = ScanConfig(data=str(data), reference=str(ref), n_reference=0, batch_size=3)
    again = run_scan(model, unlabelled, root / "out2", show_progress=False)
    assert again["metrics"] is None and {p["source"] for p in again["prompts"]} == {"data"}
    by_text = {(p["instruction"], p["input"]): p for p in again["prompts"]}
    for p in prompts:
        other = by_text[(p["instruction"], p["input"])]
        assert other["score"] == pytest.approx(p["score"], rel=1e-4, abs=1e-5)
        assert other["perplexity"] == pytest.approx(p["perplexity"], rel=1e-4)
    with pytest.raises(FileExistsError):  # a non-empty output directory is refused before any model loads
        run_scan(model, ScanConfig(data=str(data), reference=str(ref)), root / "out2", show_progress=False)


def test_run_scan_refuses_too_small_a_reference_and_a_bad_method(scan_files):
    from crowguard.config import ConfigError
    from crowguard.data import DataError
    from crowguard.recipes.scan import run_scan

    root, model_dir, ref, clean, _ = scan_files
    model = ModelConfig(name_or_path=str(model_dir))
    with pytest.raises(DataError, match="usable prompts"):  # every reference is scanned
        run_scan(model, ScanConfig(data=str(ref), reference=str(ref)), root / "o3", show_progress=False)
    with pytest.raises(ConfigError, match="mahalanobis"):
        bad = ScanConfig(data=str(clean), reference=str(ref), method="mahalanobs")  # type: ignore[arg-type]
        run_scan(model, bad, root / "o4", show_progress=False)
    with pytest.raises(DataError, match="nothing to scan"):
        run_scan(model, ScanConfig(reference=str(ref)), root / "o5", show_progress=False)
