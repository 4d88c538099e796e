"""Report text as the loader feeds it to the model, and the light augmentation of the second text view.

Radiology reports carry headers (INDICATION, COMPARISON, FINDINGS, IMPRESSION ...) of which only the
findings and impression describe the image; de-identification leaves tokens such as ``XXXX`` (IU X-ray)
or ``___`` (MIMIC-CXR) that carry no meaning and would otherwise dominate the vocabulary. Section splitting
and de-identification clean-up are the shard adapters' (``unimlip_train.format.report_text``, whose docstring states
the rules), so a report reads the same whether it was sharded by us or arrives whole; added here is what
only training wants: the section choice and order, list numbers dropped, sentence splitting and augmentation.

Section choice (``data.text.sections`` / ``data.text.order``, the same for training and evaluation):
``findings+impression`` (default), ``impression`` or ``findings``, ordered ``impression_first`` (default, so that
truncation at ``max_length`` drops findings before the impression) or ``findings_first``; ``random`` takes one
of the report's findings / impression sections per sample and epoch (seeded by the loader; evaluation, which
must be deterministic, reads ``random`` as ``findings+impression``). A list of section names is taken as
given, in its own order. A report with none of the wanted sections (a caption) is used whole.
"""
from __future__ import annotations

import random
import re
from typing import Optional, Sequence, Union

from unimlip_train.config.schema import SECTION_CHOICES
from unimlip_train.format.report_text import clean_report as _clean_deid
from unimlip_train.format.report_text import join_sentences, section_texts, split_sections

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ENUMERATOR = re.compile(r"(?:^|(?<=[.!?:;] ))\d{1,2}[.)] +")  # "IMPRESSION: 1. ... 2. ..." list numbers


def sections_or_whole(text: str, sections: Sequence[str]) -> str:
    """The wanted sections (in ``sections`` order, each ending as a sentence) when the report has any of
    them; else the whole text, as a caption or a report without those headers is still the image's text."""
    return join_sentences(section_texts(split_sections(text), sections)) or text


def clean_text(text: str) -> str:
    """Drop list numbers, then de-identification tokens and the punctuation they leave; collapse whitespace."""
    return _clean_deid(_ENUMERATOR.sub("", " ".join(text.split())))


_RANDOM_FROM = ("findings", "impression")


def wanted_sections(sections: Union[str, Sequence[str]], order: str) -> Optional[list]:
    """Section names in the order the model reads them; None for ``random`` (chosen per sample)."""
    if not isinstance(sections, str):
        return list(sections)
    if sections == "random":
        return None
    first = "impression" if order == "impression_first" else "findings"
    return sorted(sections.split("+"), key=lambda name: name != first)


def model_text(text: str, sections: Union[str, Sequence[str]] = "findings+impression",
               order: str = "impression_first", rng: Optional[random.Random] = None) -> str:
    """Report text as the model sees it: the chosen sections in order, cleaned (see the module doc).

    ``rng`` draws the section for ``random``; without one (evaluation) ``random`` means findings+impression.
    """
    wanted = wanted_sections(sections, order)
    if wanted is None:
        parts = split_sections(text)
        present = [name for name in _RANDOM_FROM if section_texts(parts, [name])]
        wanted = [rng.choice(present)] if rng is not None and present else wanted_sections(SECTION_CHOICES[0], order)
    return clean_text(sections_or_whole(text, wanted))


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
