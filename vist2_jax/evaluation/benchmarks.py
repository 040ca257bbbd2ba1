"""Loaders for long-context and math benchmarks in their published JSONL layouts, read from
a local path (nothing is downloaded), each example carrying its official metric.

* LongBench (``THUDM/LongBench`` ``data/<dataset>.jsonl``): ``input``, ``context``,
  ``answers`` (list), ``all_classes``, ``dataset``, ``length``, ``_id``; prompt templates
  from LongBench's ``dataset2prompt.json``, metric and answer length per dataset as in its
  ``eval.py`` / ``dataset2maxlen.json``.
* LooGLE (``bigainlco/LooGLE`` ``<task>.jsonl``): ``input`` (the document), ``title``,
  ``qa_pairs`` (a Python-literal list of ``{"Q", "A", "S"}``; ``"none"`` for summaries),
  ``output`` (the reference summary); prompts from its ``task2prompt.json``. QA and
  summaries are scored with ROUGE-L, cloze (``A`` a dict of masks) with exact match.
* GSM8K (``openai/grade-school-math`` ``test.jsonl``): ``question``, ``answer`` ending in
  ``#### <number>``; exact match of the final number.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Callable

from vist2_jax import storage
from vist2_jax.cli.errors import UsageError
from vist2_jax.evaluation import metrics

_QA = ("Answer the question based on the given passages. Only give me the answer and do not output any "
       "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on "
       "the given passages. Only give me the answer and do not output any other words.\n\n"
       "Question: {input}\nAnswer:")
# dataset -> (prompt template, metric, max new tokens, keep only the first line of the output)
LONGBENCH = {
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. "
                    "Answer the question asconcisely as you can, using a single phrase if possible. Do not "
                    "provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the "
                    "story asconcisely as you can, using a single phrase if possible. Do not provide any "
                    "explanation.\n\nQuestion: {input}\n\nAnswer:", "qa_f1", 128, False),
    "qasper": ("You are given a scientific article and a question. Answer the question as concisely as you "
               "can, using a single phrase or sentence if possible. If the question cannot be answered "
               "based on the information in the article, write \"unanswerable\". If the question is a "
               "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
               "explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
               "concisely as you can, using a single phrase or sentence if possible. If the question "
               "cannot be answered based on the information in the article, write \"unanswerable\". If "
               "the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not "
               "provide any explanation.\n\nQuestion: {input}\n\nAnswer:", "qa_f1", 128, False),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the "
                        "following question based on the above text, only give me the answer and do not "
                        "output any other words.\n\nQuestion: {input}\nAnswer:", "qa_f1", 64, False),
    "hotpotqa": (_QA, "qa_f1", 32, False),
    "2wikimqa": (_QA, "qa_f1", 32, False),
    "musique": (_QA, "qa_f1", 32, False),
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the "
                   "report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\n"
                   "Summary:", "rouge_l", 512, False),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. "
              "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the "
              "query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\n"
              "Answer:", "rouge_l", 512, False),
    "multi_news": ("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                   "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:", "rouge_l",
                   512, False),
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n"
             "{context}\n{input}", "classification", 64, True),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not "
                 "output any other words. The following are some examples.\n\n{context}\n\n{input}",
                 "qa_f1", 32, True),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
               "{context}\n\n{input}", "rouge_l", 128, True),
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may be "
                      "duplicates. Please carefully read these paragraphs and determine how many unique "
                      "paragraphs there are after removing duplicates. In other words, how many "
                      "non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
                      "count of unique paragraphs after removing duplicates. The output format should only "
                      "contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
                      "count", 32, False),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. Please "
                             "determine which paragraph the abstract is from.\n\n{context}\n\nThe following "
                             "is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that "
                             "the abstract is from. The answer format must be like \"Paragraph 1\", "
                             "\"Paragraph 2\", etc.\n\nThe answer is: ", "retrieval", 32, False),
    "lcc": ("Please complete the code given below. \n{context}Next line of code:\n", "code_sim", 64, False),
    "repobench-p": ("Please complete the code given below. \n{context}{input}Next line of code:\n",
                    "code_sim", 64, False),
}
LOOGLE_QA = "Please answer the question based on the long texts below. \n{input}\nQuestion: {Q}\nAnswer: "
LOOGLE_SUMMARY = "Please generate a summary of the below paper. \n{input}\n Summarization: "
LOOGLE_CLOZE = ("Please fill in the clozes based on the given long texts below. Each of the placeholder "
                "'<mask-n>' in the question could be an entity of Person, Location or Organiocation. The "
                "same masks represent the same entity. Output a json format answer, for example: "
                "{{'<mask-0>': 'Bob', '<mask-1>': 'Gorrosion Magazine','<mask-2>': 'Bethel Horizon'}}\n"
                "{input}\n Question: {Q} What are the masked entities? \nAnswer:")
GSM8K_PROMPT = "Question: {question}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt to generate from, its reference answers and how a prediction is scored
    (the best score over the answers)."""

    prompt: str
    answers: tuple[str, ...]
    metric: str  # a key of SCORERS
    max_new_tokens: int
    group: str  # the dataset / task the figures are reported under
    first_line: bool = False
    all_classes: tuple[str, ...] = ()


def cloze_match(prediction: str, reference: str) -> float:
    """LooGLE cloze: share of the masks whose entity the prediction names exactly."""
    wanted = ast.literal_eval(reference)
    try:
        given = ast.literal_eval(prediction.strip().split("\n")[0])
    except (ValueError, SyntaxError):
        given = {}
    given = given if isinstance(given, dict) else {}
    return sum(str(given.get(k, "")).strip() == str(v).strip() for k, v in wanted.items()) / max(len(wanted), 1)


SCORERS: dict[str, Callable[..., float]] = {
    "qa_f1": metrics.qa_f1, "rouge_l": metrics.rouge_l, "classification": metrics.classification_score,
    "retrieval": metrics.retrieval_score, "count": metrics.count_score, "code_sim": metrics.code_similarity,
    "exact_match": metrics.exact_match, "gsm8k": metrics.gsm8k_match, "cloze": cloze_match,
}


def score(example: Example, prediction: str) -> float:
    if example.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    scorer = SCORERS[example.metric]
    extra = {"all_classes": example.all_classes} if example.metric == "classification" else {}
    return max(scorer(prediction, answer, **extra) for answer in example.answers)


def _jsonl(path) -> list[dict]:
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise UsageError(f"--data: no JSONL file at {path}")
    records = []
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append({"__file": file.stem, **json.loads(line)})
                except json.JSONDecodeError as err:
                    raise UsageError(f"--data: {file}:{number} is not JSON ({err.msg})") from None
    return records


def _need(record: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise UsageError(f"--data: {where} lacks {', '.join(missing)} (not the published layout)")


def load_longbench(path: str | Path) -> list[Example]:
    examples = []
    for record in _jsonl(storage.as_path(path)):
        _need(record, ("input", "context", "answers"), f"{record['__file']}.jsonl")
        name = record.get("dataset") or record["__file"].removesuffix("_e")
        if name not in LONGBENCH:
            raise UsageError(f"--data: LongBench dataset {name!r} has no prompt here; known: "
                             f"{', '.join(sorted(LONGBENCH))}")
        template, metric, max_new, first_line = LONGBENCH[name]
        examples.append(Example(template.format(context=record["context"], input=record["input"]),
                                tuple(record["answers"]), metric, max_new, name, first_line,
                                tuple(record.get("all_classes") or ())))
    return examples


def load_loogle(path: str | Path) -> list[Example]:
    examples = []
    for record in _jsonl(storage.as_path(path)):
        _need(record, ("input", "qa_pairs", "output"), f"{record['__file']}.jsonl")
        task = record["__file"]
        if record["qa_pairs"] == "none":
            examples.append(Example(LOOGLE_SUMMARY.format(input=record["input"]), (record["output"],),
                                    "rouge_l", 512, task or "longdep_summarization"))
            continue
        for pair in ast.literal_eval(record["qa_pairs"]):
            cloze = isinstance(pair["A"], dict)
            template = LOOGLE_CLOZE if cloze else LOOGLE_QA
            examples.append(Example(template.format(input=record["input"], Q=pair["Q"]),
                                    (repr(pair["A"]) if cloze else pair["A"],),
                                    "cloze" if cloze else "rouge_l", 64 if cloze else 128, task))
    return examples


def load_gsm8k(path: str | Path) -> list[Example]:
    examples = []
    for record in _jsonl(storage.as_path(path)):
        _need(record, ("question", "answer"), f"{record['__file']}.jsonl")
        if "####" not in record["answer"]:
            raise UsageError(f"--data: a GSM8K answer lacks its '#### <number>' line: {record['answer'][:60]!r}")
        examples.append(Example(GSM8K_PROMPT.format(question=record["question"]), (record["answer"],),
                                "gsm8k", 256, "gsm8k"))
    return examples


LOADERS = {"longbench": load_longbench, "loogle": load_loogle, "gsm8k": load_gsm8k}
