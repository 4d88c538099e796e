"""Report text: section splitting and de-identification clean-up, the one implementation of both.

Used by the IU X-ray and MIMIC-CXR adapters, so that a shard's ``txt`` is already the text a model trains on
(the selected sections, readable; the raw sections stay in the metadata), and by the training loader
(``unimlip_train.data.text``), so that a whole report arriving in a shard is read by the same rules. Kept
light (``re``/``argparse`` only) because the loader's worker processes import it.

Sections (``split_sections``): a header is a name followed by a colon, recognised
- in capitals at the start of a line, whatever the name ("FINDINGS:", "WET READ:", "CLINICAL HISTORY:"), so
  an unknown section still ends the one before it;
- in any case at the start of a line or of a sentence when it is a usual report header ("Findings:",
  "... normal. Impression: ..."); and in capitals anywhere ("CHEST (PA AND LAT) INDICATION: ...", as in a
  report whose line breaks were lost). A usual name in lower case mid-sentence ("compared to the prior
  exam: no change") and a mixed-case sub-heading ("Lungs: clear.") are text, not headers.
Singular and plural name the same section ("impressions" is "impression"), and a combined header such as
"FINDINGS AND IMPRESSION" or "FINDINGS/IMPRESSION" counts for each of its parts.

De-identification clean-up (``clean_report``):
- Open-I replaces many words with ``XXXX`` (often not even identifiers: "Pulmonary XXXX normal"); MIMIC-CXR
  uses ``___``. A token is three or more ``X`` (not inside a word) or underscores: "XX" is left alone, it
  can be a Roman numeral. ``x-XXXX`` / ``X-XXXX`` is restored to ``x-ray`` (the one unambiguous redaction).
- Every other run of such tokens (with the spaces, commas, slashes or hyphens joining them) is removed, or
  replaced by ``placeholder`` when one is given. Hyphens left dangling are dropped, spaces before punctuation
  and empty parentheses are tidied, a sentence left with nothing but punctuation disappears, and a sentence
  that began with a removed token starts with a capital letter again.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence

_TOKEN = r"(?:(?<![A-Za-z])X{3,}|_{3,})(?:'[a-z]+)?"
_RUN = re.compile(rf"{_TOKEN}(?:[\s,/-]+{_TOKEN})*")
_XRAY = re.compile(r"\b([xX])-XXXX\b")
_GAP = "\x00"  # marks where a run was removed, until the tidy-up below has used it
# A removed run that opened a sentence (not after "Dr." / "Mr." / "Ms."), followed by a lower-case word.
_SENTENCE_GAP = re.compile(rf"(^|(?<!\bDr)(?<!\bMr)(?<!\bMs)[.!?]\s*){_GAP}[\s,;:]*([a-z])")
_KNOWN = ("findings|impressions?|indications?|comparisons?|(?:clinical )?history|technique|examination|exam|"
          "conclusions?|recommendations?|reason for (?:exam|study)|notification")
_HEADER = re.compile(
    r"^[ \t]*(?P<caps>[A-Z][A-Z &/()-]{1,40}?)[ \t]*:"  # any capitals header opening a line
    rf"|(?:^[ \t]*|(?<=[.!?])[ \t]+)(?P<known>(?i:{_KNOWN}))[ \t]*:"  # a usual one opening a line or sentence
    rf"|\b(?P<inline>{_KNOWN.upper()})[ \t]*:",  # a usual one in capitals anywhere
    re.MULTILINE)
_PARTS = re.compile(r"\s+and\s+|\s*/\s*")  # "findings and impression", "findings/impression"


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
    """Split a free-text report on its headers (see the module docstring); keys are lower-case header names.

    Bodies have their whitespace collapsed; empty ones are left out. Text before the first header is kept
    under ``""``. A repeated header keeps both parts, joined by a space.
    """
    sections: dict[str, str] = {}
    starts = list(_HEADER.finditer(report))
    bounds = [("", 0, starts[0].start() if starts else len(report))]
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(report)
        name = match.group("caps") or match.group("known") or match.group("inline")
        bounds.append((" ".join(name.lower().split()), match.end(), end))
    for name, begin, end in bounds:
        body = " ".join(report[begin:end].split())
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def _singular(name: str) -> str:
    return name[:-1] if name.endswith("s") else name


def section_keys(sections: Mapping[str, str], wanted: Sequence[str]) -> list[str]:
    """The report's section names that hold the wanted sections, in the order asked; each used at most once."""
    used: list[str] = []
    for name in wanted:
        for key in sections:
            if key not in used and _singular(name.lower()) in {_singular(p) for p in _PARTS.split(key)}:
                used.append(key)
    return used


def section_texts(sections: Mapping[str, str], wanted: Sequence[str]) -> list[str]:
    """The bodies of the wanted sections, in the order asked; each section is used at most once."""
    return [sections[key] for key in section_keys(sections, wanted)]


def join_sentences(pieces: Iterable[str]) -> str:
    """Non-empty pieces joined by spaces, each ending as a sentence, so sections do not run into each other."""
    return " ".join(p if p[-1] in ".!?" else p + "." for p in pieces if p)


def normalise_report(text: str) -> str:
    """The duplicate rule: two reports are the same when they are equal after collapsing whitespace and
    case-folding (the towers' tokenizers are uncased, so a case-only difference is no difference to the model).
    Evaluation counts such reports as correct for each other; training treats them as positives."""
    return " ".join(text.split()).casefold()


def report_id(text: str) -> int:
    """A 63-bit id of ``normalise_report(text)`` (fits an int64 tensor; stable across processes and runs)."""
    digest = hashlib.blake2b(normalise_report(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def report_body(text: str) -> str:
    """The report as the model reads it by default, headers aside: impression then findings when it has them,
    else the whole text. What the leakage audit hashes (with ``report_id``), so a headed shard text and the
    same report without headers are one report."""
    return join_sentences(section_texts(split_sections(text), ("impression", "findings"))) or text


def select_sections(sections: Mapping[str, str], wanted: Sequence[str], placeholder: str = "",
                    headed: bool = False) -> str:
    """The wanted sections, cleaned, in the order asked, each ending as a sentence, joined by spaces.

    ``headed`` keeps each section's header ("FINDINGS: ... IMPRESSION: ..."), one section a line, so the training
    loader can still choose and order sections (``data.text.sections`` / ``order``). Returns ``""`` when none of
    the wanted sections has text.
    """
    keys = [key for key in section_keys(sections, wanted) if clean_report(sections[key], placeholder)]
    bodies = [join_sentences([clean_report(sections[key], placeholder)]) for key in keys]
    if headed:
        return "\n".join(f"{key.upper()}: {body}" for key, body in zip(keys, bodies))
    return " ".join(bodies)
