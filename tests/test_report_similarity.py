"""bench/report_similarity.py (issue 21's text SSL question) against a naive pair loop written here."""
from __future__ import annotations

import csv
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import report_similarity  # bench/ is not a package  # noqa: E402

REPORTS = [
    ("FINDINGS: Heart size normal. Lungs clear. IMPRESSION: No acute cardiopulmonary abnormality.", "normal"),
    ("FINDINGS: Heart size normal. Lungs are clear. IMPRESSION: No acute cardiopulmonary abnormality.", "normal"),
    ("FINDINGS: The XXXX heart is normal. IMPRESSION: Normal chest.", "normal"),
    ("FINDINGS: heart size normal. lungs clear. IMPRESSION: no acute cardiopulmonary abnormality.", "normal"),
    ("FINDINGS: Right lower lobe consolidation. IMPRESSION: Right lower lobe pneumonia.", "pneumonia"),
    ("FINDINGS: Patchy opacity, heart size normal. IMPRESSION: Right lower lobe pneumonia.", "pneumonia"),
    ("FINDINGS: Left base opacity. IMPRESSION: Pneumonia.", "pneumonia"),
]


def naive(texts: list, labels: list, threshold: float) -> dict:
    """Per pair of different reports (case and spacing aside): the word-set Jaccard of impression + findings."""
    def words(text):
        body = text.split("IMPRESSION:")[1] + " " + text.split("IMPRESSION:")[0].replace("FINDINGS:", "")
        return set(re.findall(r"[a-z]+", body.lower())) - {"xxxx"}

    def impression(text):
        return " ".join(text.split("IMPRESSION:")[1].split()).casefold()

    pairs = [(i, j) for i, j in itertools.combinations(range(len(texts)), 2)
             if " ".join(texts[i].split()).casefold() != " ".join(texts[j].split()).casefold()]
    jac = {(i, j): len(words(texts[i]) & words(texts[j])) / len(words(texts[i]) | words(texts[j])) for i, j in pairs}
    chosen = [p for p in pairs if jac[p] >= threshold]
    equal = [(i, j) for i, j in pairs if impression(texts[i]) == impression(texts[j])]
    same = {p for p in pairs if labels[p[0]] == labels[p[1]]}
    pneumonia = [p for p in same if labels[p[0]] == "pneumonia"]
    return {"pairs": len(pairs), "selected": len(chosen) / len(pairs),
            "precision": sum(p in same for p in chosen) / len(chosen),
            "recall_pneumonia": sum(p in chosen for p in pneumonia) / len(pneumonia),
            "equal_impression_selected": len(equal) / len(pairs),
            "between_median": sorted(jac[p] for p in pairs if p not in same)}


def test_similarity_table_equals_a_naive_pair_loop():
    texts, labels = [t for t, _ in REPORTS], [c for _, c in REPORTS]
    table = report_similarity.similarity_table(texts, labels)
    for row in table["thresholds"]:
        want = naive(texts, labels, row["threshold"])
        assert table["pairs"] == want["pairs"] == 20  # 21 pairs, one is the same report in other case
        assert row["selected"] == pytest.approx(want["selected"], abs=1e-4)
        if want["selected"]:
            assert row["precision_same_class"] == pytest.approx(want["precision"], abs=1e-3)
        assert row["recall_pneumonia-pneumonia"] == pytest.approx(want["recall_pneumonia"], abs=1e-3)
    want = naive(texts, labels, 0.0)
    assert table["equal_impression"]["selected"] == pytest.approx(want["equal_impression_selected"], abs=1e-4)
    between = want["between_median"]
    assert table["median_jaccard"]["between"] == pytest.approx(
        (between[len(between) // 2 - 1] + between[len(between) // 2]) / 2, abs=1e-3)


def test_cli_reads_a_manifest_and_refuses_a_missing_one(tmp_path):
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "text", "labels", "source_split"])
        writer.writeheader()
        writer.writerows({"id": str(i), "image": f"{i}.png", "text": t, "labels": c, "source_split": "train"}
                         for i, (t, c) in enumerate(REPORTS))
    script = str(REPO / "bench" / "report_similarity.py")
    done = subprocess.run([sys.executable, script, "--pairs", str(manifest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["samples"] == len(REPORTS)
    missing = subprocess.run([sys.executable, script, "--pairs", str(tmp_path / "none.csv")], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr
