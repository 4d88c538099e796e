"""Report text shared by the IU X-ray and MIMIC-CXR adapters: sections and de-identification clean-up.

Why here and not in the loader: the shard's ``txt`` should already be the text a model trains on (the
selected sections, readable), and the raw sections stay in the sample's metadata for anyone who wants others.

De-identification clean-up (documented behaviour, ``clean_report``):
- Open-I replaces many words with ``XXXX`` (often not even identifiers: "Pulmonary XXXX normal"); MIMIC-CXR
  uses ``___``. ``x-XXXX`` / ``X-XXXX`` is restored to ``x-ray`` (the one redaction that is unambiguous).
- Every other run of such tokens (with the spaces, commas, slashes or hyphens joining them) is removed, or
  replaced by ``placeholder`` when one is given. Hyphens left dangling are dropped, spaces before punctuation
  and empty parentheses are tidied, a sentence left with nothing but punctuation disappears, and a sentence
  that began with a removed token starts with a capital letter again.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence

_TOKEN = r"(?:(?<![A-Za-z])X{3,}|_{3,})(?:'[a-z]+)?"
_RUN = re.compile(rf"{_TOKEN}(?:[\s,/-]+{_TOKEN})*")
_XRAY = re.compile(r"\b([xX])-XXXX\b")
_GAP = "\x00"  # marks where a run was removed, until the tidy-up below has used it
# A removed run that opened a sentence (not after "Dr." / "Mr." / "Ms."), followed by a lower-case word.
_SENTENCE_GAP = re.compile(rf"(^|(?<!\bDr)(?<!\bMr)(?<!\bMs)[.!?]\s*){_GAP}[\s,;:]*([a-z])")
# A section header at the start of a line: upper-case words ending in a colon ("FINDINGS:", "WET READ:").
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]{1,40}?)[ \t]*:", re.MULTILINE)


def parse_sections(value: str) -> list[str]:
    """argparse type for ``--sections findings,impression``: lower-case names, in the order given."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of section names, e.g. findings,impression")
    return names


def clean_report(text: str, placeholder: str = "") -> str:
    """Collapse whitespace and remove (or replace) de-identification tokens, keeping the text readable."""
    text = _XRAY.sub(r"\1-ray", text)
    if placeholder:
        return _tidy(_RUN.sub(placeholder, text))
    text = _RUN.sub(_GAP, text)
    text = re.sub(rf"(?<=\w)-{_GAP}|{_GAP}-(?=\w)", _GAP, text)  # "dual-XXXX" -> "dual"
    text = _SENTENCE_GAP.sub(lambda m: m.group(1) + m.group(2).upper(), text)
    return _tidy(text.replace(_GAP, ""))


def _tidy(text: str) -> str:
    """Whitespace and punctuation left over after token removal."""
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([.,;:!?)])", r"\1", text)
    text = re.sub(r"([,;:])(?=[.,;:!?])", "", text)  # ", ." -> "."
    text = re.sub(r"([.!?])(?:\s*[.,;:])+", r"\1", text)  # ". ." -> "."
    return re.sub(r"^[\s.,;:]+", "", text).strip()


def split_sections(report: str) -> dict[str, str]:
    """Split a free-text report on its upper-case ``HEADER:`` lines; keys are lower-case header names.

    Text before the first header is kept under ``""``. A repeated header keeps both parts, joined by a space.
    """
    sections: dict[str, str] = {}
    starts = list(_HEADER.finditer(report))
    bounds = [("", 0, starts[0].start() if starts else len(report))]
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(report)
        bounds.append((" ".join(match.group(1).lower().split()), match.end(), end))
    for name, begin, end in bounds:
        body = " ".join(report[begin:end].split())
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def select_sections(sections: Mapping[str, str], wanted: Sequence[str], placeholder: str = "") -> str:
    """The wanted sections, cleaned, in the order asked, each ending as a sentence, joined by spaces.

    A combined header such as "FINDINGS AND IMPRESSION" or "FINDINGS/IMPRESSION" counts for each of its parts
    (and is used once). Returns ``""`` when none of the wanted sections has text.
    """
    used: list[str] = []
    for name in wanted:
        for key in sections:
            if key not in used and name in re.split(r"\s+and\s+|\s*/\s*", key):
                used.append(key)
    pieces = [clean_report(sections[key], placeholder) for key in used]
    return " ".join(p if p[-1] in ".!?" else p + "." for p in pieces if p)
