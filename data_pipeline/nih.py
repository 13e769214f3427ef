"""Reader for NIH ChestX-ray14: `Data_Entry_2017.csv` (or `_v2020`) + `images/<Image Index>`."""
from __future__ import annotations

import os

from .csv_table import no_usable_rows, read_table, resolve_inside
from .records import NIH_FINDINGS, ReadResult, XrayRecord, canonical_finding

NIH_TABLES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
NIH_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position")
_SEXES = {"F": "female", "M": "male"}
_PROJECTIONS = ("AP", "PA")


def _parse_age(text: str) -> int | None:
    """NIH ages are integers; old releases wrote "058Y". A handful of rows hold impossible ages
    (> 120): keep the image but drop the age rather than prompt "90s" for a typo. A blank age is
    unknown (real exports in the NIH layout leave it blank), not a bad row."""
    if not text:
        return None
    text = text.upper().removesuffix("Y")
    if not text.isdigit():
        raise ValueError(text)
    age = int(text)
    return age if age <= 120 else None


def read_nih(root: str) -> ReadResult:
    """Records of an NIH ChestX-ray14 directory; rows with bad values or missing images are skipped."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"{root}: NIH ChestX-ray14 root directory not found")
    tables = [os.path.join(root, t) for t in NIH_TABLES if os.path.isfile(os.path.join(root, t))]
    if not tables:
        raise ValueError(f"{root}: no {' or '.join(NIH_TABLES)} found")
    csv_path = tables[0]
    images_dir = os.path.join(root, "images")
    records, skipped = [], []
    for row_number, row in read_table(csv_path, NIH_COLUMNS):
        where = f"{csv_path}:{row_number}"
        name = row["Image Index"]
        image_path = resolve_inside(root, images_dir, name, where)
        labels_text = row["Finding Labels"]
        names = [] if labels_text in ("No Finding", "") else labels_text.split("|")
        reason, age = None, None
        try:
            age = _parse_age(row["Patient Age"])
        except ValueError:
            reason = f"bad Patient Age value {row['Patient Age']!r}"
        unknown = [n for n in names if n not in NIH_FINDINGS]
        if not name:
            reason = "empty Image Index"
        elif unknown:
            reason = f"unknown finding {unknown[0]!r}"
        elif not labels_text:
            reason = "empty Finding Labels"
        elif not row["Patient ID"]:
            reason = "empty Patient ID"
        elif row["Patient Gender"] not in _SEXES:
            reason = f"bad Patient Gender value {row['Patient Gender']!r}"
        elif row["View Position"] not in _PROJECTIONS:
            reason = f"bad View Position value {row['View Position']!r}"
        elif reason is None and not os.path.isfile(image_path):
            reason = "image file missing"
        if reason is not None:
            skipped.append(f"{where}: {name}: {reason}")
            continue
        present = set(names)
        findings = [canonical_finding(n) for n in NIH_FINDINGS if n in present] or ["no finding"]
        patient = row["Patient ID"]
        records.append(XrayRecord(
            image_path=image_path, patient_id=patient, study_id=f"{patient}/{row['Follow-up #']}", dataset="nih",
            findings=tuple(findings), uncertain=(), view="frontal", projection=row["View Position"],
            sex=_SEXES[row["Patient Gender"]], age=age,
            labels=tuple(1.0 if n in present else 0.0 for n in NIH_FINDINGS)))
    if not records:
        raise no_usable_rows(csv_path, skipped)
    return ReadResult(records, skipped)
