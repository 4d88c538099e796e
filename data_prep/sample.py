"""One planned row and its encoded images -> the tar members of one WebDataset sample.

Why here: this is where the sample layout that the training loader, ``verify`` and ``audit`` read is made
(``unimlip_train.format.shards`` describes it). Study samples (``Row.views``) are one sample with several
images: the first as ``KEY.jpg``/``KEY.png`` (so every one-image reader still finds an image), the others as
``KEY.view1.jpg`` ...; the json's ``views`` lists each member with its view position, source and hashes. A
view that cannot be decoded is dropped and recorded; the sample is skipped only when none is left. Every
sample's json carries ``pixel_sha256`` and ``phash`` (per view too) and ``report_hash``, which the leakage
audit (``data_prep.audit``) reads instead of decoding images again.
"""
from __future__ import annotations

import json

from data_prep.plan import Planned, error_entry, row_views
from unimlip_train.format.shards import report_hash


def _image_fields(info: dict) -> dict:
    """What the json keeps of an encoded image's metadata (its DICOM view position goes to ``view``)."""
    return {k: v for k, v in info.items() if k != "dicom_view"}


def build_sample(p: Planned, split: str, source: str, results: list[tuple]) -> tuple[list | None, list[dict]]:
    """(tar members or None, error entries) of one row from its images' encode results."""
    views = row_views(p.row)
    ok = [(v, r) for v, r in zip(views, results) if r[0] == "ok"]
    failed = [(v, r[1]) for v, r in zip(views, results) if r[0] == "error"]
    if not ok:
        reason = failed[0][1] if len(failed) == 1 else "no usable image: " + "; ".join(
            f"{v.name or v.path}: {why}" for v, why in failed)
        return None, [error_entry(p.row, p.key, split, reason)]
    errors = [{**error_entry(p.row, p.key, split, f"view {v.name or v.path} dropped: {why}"), "image": v.path,
               "dropped_view": True} for v, why in failed]
    meta = dict(p.row.metadata)
    meta.setdefault("source", source)
    meta.setdefault("orig_path", p.row.image)
    first_view, (_, _, _, first_info) = ok[0]
    if not meta.get("view"):
        meta["view"] = first_view.position or first_info.get("dicom_view", "")
    labels = [p.row.labels] if isinstance(p.row.labels, str) else p.row.labels
    meta.update(id=p.row.id, group=p.group, labels=[str(x) for x in labels], split=split,
                report_hash=report_hash(p.row.text.strip()), **_image_fields(first_info))
    members = []
    described = []
    for i, (view, (_, ext, data, info)) in enumerate(ok):
        member = ext if i == 0 else f"view{i}.{ext}"
        members.append((f"{p.key}.{member}", data))
        described.append({"member": member, "view": view.position or info.get("dicom_view", ""),
                          "name": view.name, "orig_path": view.path, **_image_fields(info)})
    if p.row.views:
        meta.update(orig_path=ok[0][0].path, views=described)
    text = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
    members += [(f"{p.key}.json", text.encode("utf-8")), (f"{p.key}.txt", p.row.text.strip().encode("utf-8"))]
    return members, errors
