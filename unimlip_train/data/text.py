"""Report text: section selection and clean-up, and the light augmentation of the second text view.

Radiology reports carry headers (INDICATION, COMPARISON, FINDINGS, IMPRESSION ...) of which only the
findings and impression describe the image; de-identification leaves tokens such as ``XXXX`` (IU X-ray)
or ``___`` (MIMIC-CXR) that carry no meaning and would otherwise dominate the vocabulary.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

# Headers in the usual report vocabulary, anywhere in the text ("FINDINGS: ..."), or any ALL-CAPS header
# at the start of a line ("CLINICAL HISTORY:"), so unknown sections still end the previous one.
_HEADER = re.compile(
    r"(?:(?<=\n)|^)[ \t]*(?P<caps>[A-Z][A-Z /&-]{2,40}):"
    r"|\b(?i:(?P<known>findings|impressions?|indications?|comparisons?|history|clinical history|technique|"
    r"examination|exam|conclusions?|recommendations?|reason for (?:exam|study)|notification))\s*:"
)
_DEID = re.compile(r"(?<![A-Za-z])X{2,}(?![A-Za-z])|_{2,}")
_DANGLING_HYPHEN = re.compile(r"(?<=\w)-(?=[\s.,;:!?]|$)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_REPEATED_PUNCT = re.compile(r"([.,;:!?])(?:\s*[.,;:!?])+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ENUMERATOR = re.compile(r"(?:^|(?<=[.!?:;] ))\d{1,2}[.)] +")  # "IMPRESSION: 1. ... 2. ..." list numbers
_WHITESPACE = re.compile(r"\s+")


def _norm_name(name: str) -> str:
    """'FINDINGS' and 'finding', 'Impressions' and 'impression' name the same section."""
    name = _WHITESPACE.sub(" ", name.strip().lower())
    return name[:-1] if name.endswith("s") else name


def select_sections(text: str, sections: Sequence[str]) -> str:
    """The wanted sections (in ``sections`` order) when the report has headers; else the whole text."""
    headers = list(_HEADER.finditer(text))
    if not headers or not sections:
        return text
    found: dict = {}
    for i, m in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = text[m.end():end].strip()
        if body:
            found.setdefault(_norm_name(m.group("known") or m.group("caps")), []).append(body)
    parts = [b for name in sections for b in found.get(_norm_name(name), [])]
    return " ".join(parts) if parts else text


def clean_text(text: str) -> str:
    """Drop de-identification tokens and list numbers, tidy the punctuation they leave, collapse whitespace."""
    text = _DEID.sub(" ", text)
    text = _DANGLING_HYPHEN.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip()
    text = _ENUMERATOR.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(lambda m: m.group(1), text)
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s.strip(" .,;:!?")]
    return " ".join(sentences)


def clean_report(text: str, sections: Sequence[str] = ("findings", "impression")) -> str:
    """Report text as the model sees it: selected sections, cleaned."""
    return clean_text(select_sections(text, sections))


def split_sentences(text: str) -> list:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def augment_report(text: str, rng: random.Random, shuffle_p: float, drop_p: float, span_mask_p: float,
                   mask_token: str = "[MASK]") -> str:
    """A second view of a cleaned report for the text self-supervision term.

    With probability ``shuffle_p`` the sentence order is shuffled (findings are largely order-free); each
    sentence is dropped with probability ``drop_p`` (one always stays); with probability ``span_mask_p``
    one span of 1-3 words is replaced by ``mask_token``.
    """
    sentences = split_sentences(text)
    if len(sentences) > 1 and rng.random() < shuffle_p:
        rng.shuffle(sentences)
    if len(sentences) > 1 and drop_p > 0:
        kept = [s for s in sentences if rng.random() >= drop_p]
        sentences = kept or [sentences[rng.randrange(len(sentences))]]
    words = " ".join(sentences).split(" ")
    if span_mask_p > 0 and len(words) > 1 and rng.random() < span_mask_p:
        length = rng.randint(1, min(3, len(words) - 1))
        start = rng.randrange(len(words) - length + 1)
        words[start:start + length] = [mask_token]
    return " ".join(words)
