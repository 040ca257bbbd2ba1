"""Scores, each as its benchmark defines it. Edit distance from ``rapidfuzz``, ROUGE from
``rouge-score``; QA F1, classification, retrieval and count scores follow LongBench's
``metrics.py``; GSM8K compares the final number."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

import numpy as np
from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein


def char_error_rate(prediction: str, reference: str) -> float:
    """Character edit distance / reference length (the normalized edit distance of OCR)."""
    return Levenshtein.distance(prediction, reference) / max(len(reference), 1)


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalize_answer(text: str) -> str:
    """SQuAD/LongBench normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def qa_f1(prediction: str, reference: str) -> float:
    """Token-level F1 of normalized answers."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (``rouge_score``, its default tokenizer, no stemming)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def classification_score(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """LongBench (trec, lsht): classes named in the prediction, minus those that are only
    parts of the reference; 1/k when the reference is among the k left."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in reference and c != reference)]
    return 1.0 / len(named) if reference in named else 0.0


def retrieval_score(prediction: str, reference: str) -> float:
    """LongBench passage_retrieval: share of the numbers in the prediction that name the paragraph."""
    wanted = re.findall(r"Paragraph (\d+)", reference)
    numbers = re.findall(r"\d+", prediction)
    return sum(n == wanted[0] for n in numbers) / len(numbers) if wanted and numbers else 0.0


def count_score(prediction: str, reference: str) -> float:
    """LongBench passage_count: share of the numbers in the prediction equal to the count."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def code_similarity(prediction: str, reference: str) -> float:
    """LongBench lcc / repobench-p: fuzzy ratio of the first code line of the prediction."""
    lines = [line for line in prediction.lstrip("\n").split("\n")
             if "`" not in line and "#" not in line and "//" not in line]
    return fuzz.ratio(lines[0] if lines else "", reference) / 100.0


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer number of a GSM8K solution: after ``####`` when present, else the last
    number in the text; commas and a trailing ``.0`` dropped."""
    tail = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    number = found[0 if "####" in text else -1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def gsm8k_match(prediction: str, reference: str) -> float:
    expected = final_number(reference)
    return float(expected is not None and final_number(prediction) == expected)


def bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, samples: int = 1000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """sum(num)/sum(den) and its percentile bootstrap interval, resampling units (documents)."""
    numerators, denominators = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    estimate = numerators.sum() / max(denominators.sum(), 1e-12)
    if len(numerators) < 2:
        return float(estimate), float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, len(numerators), (samples, len(numerators)))
    ratios = numerators[picks].sum(1) / np.maximum(denominators[picks].sum(1), 1e-12)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(estimate), float(low), float(high)
