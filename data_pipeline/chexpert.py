"""Reader for CheXpert-v1.0-small exactly as released (train.csv / valid.csv + JPEGs).

`root` is the `CheXpert-v1.0-small` directory. CSV paths start with `CheXpert-v1.0-small/` and are
resolved against root's parent (if the directory was renamed, the prefix is mapped onto root).
"""
from __future__ import annotations

import math
import os
import re
from typing import Sequence

from .csv_table import no_usable_rows, read_table, resolve_inside
from .records import CHEXPERT_OBSERVATIONS, ReadResult, XrayRecord, canonical_finding

CHEXPERT_PREFIX = "CheXpert-v1.0-small/"
METADATA_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
UNCERTAINTY_POLICIES = ("ignore", "zeros", "ones")
_VIEWS = {"Frontal": "frontal", "Lateral": "lateral"}
_SEXES = {"Female": "female", "Male": "male", "Unknown": "unknown", "": "unknown"}
_PROJECTIONS = ("AP", "PA", "LL", "RL")
_VALUES = {"": math.nan, "1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0}
_PATIENT_STUDY = re.compile(r"(?:^|/)(patient\d+)/(study\d+)/[^/]+$")


def read_chexpert(root: str, split: str = "train", uncertainty: str = "ignore",
                  views: Sequence[str] = ("frontal",), projections: Sequence[str] | None = None) -> ReadResult:
    """Records of `<root>/<split>.csv`.

    uncertainty: what -1 ("uncertain") becomes. "ignore" masks the label (nan) and marks the
    finding uncertain in the prompt (U-Ignore); "zeros" makes it negative; "ones" positive.
    Blank ("not mentioned") stays nan in `labels` and is not a finding.
    views: subset of ("frontal", "lateral"); projections: None (all) or a subset of AP/PA/LL/RL.
    Rows with bad values or missing image files are skipped and listed in `skipped`.
    """
    if uncertainty not in UNCERTAINTY_POLICIES:
        raise ValueError(f"uncertainty: {uncertainty!r} is not one of {', '.join(UNCERTAINTY_POLICIES)}")
    if split not in ("train", "valid"):
        raise ValueError(f"split: {split!r} is not 'train' or 'valid'")
    bad_views = [v for v in views if v not in _VIEWS.values()]
    if bad_views or not views:
        raise ValueError(f"views: {list(views)!r} must be a non-empty subset of frontal, lateral")
    if projections is not None:
        bad = [p for p in projections if p not in _PROJECTIONS]
        if bad or not projections:
            raise ValueError(f"projections: {list(projections)!r} must be a non-empty subset of {', '.join(_PROJECTIONS)}")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"{root}: CheXpert root directory not found")
    csv_path = os.path.join(root, f"{split}.csv")
    rows = read_table(csv_path, METADATA_COLUMNS + CHEXPERT_OBSERVATIONS)
    prefix = os.path.basename(root.rstrip(os.sep)) + "/"

    records, skipped = [], []
    for row_number, row in rows:
        where = f"{csv_path}:{row_number}"
        rel = row["Path"]
        # Paths are refused (error) before anything else: a table pointing outside its dataset
        # is not a bad row but a bad file.
        if rel.startswith(prefix):
            image_path = resolve_inside(root, os.path.dirname(root), rel, where)
        elif rel.startswith(CHEXPERT_PREFIX):
            image_path = resolve_inside(root, root, rel[len(CHEXPERT_PREFIX):], where)
        else:
            image_path = resolve_inside(root, root, rel, where)
        reason = None
        view = _VIEWS.get(row["Frontal/Lateral"])
        projection = row["AP/PA"]
        match = _PATIENT_STUDY.search(rel)
        values = [_VALUES.get(row[c]) for c in CHEXPERT_OBSERVATIONS]
        if view is None:
            reason = f"bad Frontal/Lateral value {row['Frontal/Lateral']!r}"
        elif projection not in _PROJECTIONS + ("",):
            reason = f"bad AP/PA value {projection!r}"
        elif row["Sex"] not in _SEXES:
            reason = f"bad Sex value {row['Sex']!r}"
        elif row["Age"] and not row["Age"].isdigit():
            reason = f"bad Age value {row['Age']!r}"
        elif None in values:
            column = CHEXPERT_OBSERVATIONS[values.index(None)]
            reason = f"bad {column} value {row[column]!r}"
        elif match is None:
            reason = "path is not .../patientN/studyN/<image>"
        if reason is None and (view not in views or (projections is not None and projection not in projections)):
            continue  # filtered out on purpose, not skipped
        if reason is None and not os.path.isfile(image_path):
            reason = "image file missing"
        if reason is not None:
            skipped.append(f"{where}: {rel}: {reason}")
            continue

        findings, uncertain, labels = [], [], []
        for name, value in zip(CHEXPERT_OBSERVATIONS, values):
            if value == -1.0:
                value = {"ignore": math.nan, "zeros": 0.0, "ones": 1.0}[uncertainty]
                if uncertainty == "ignore":
                    uncertain.append(canonical_finding(name))
            if value == 1.0:
                findings.append(canonical_finding(name))
            labels.append(value)
        patient, study = match.group(1), match.group(2)
        records.append(XrayRecord(
            image_path=image_path, patient_id=patient, study_id=f"{patient}/{study}", dataset="chexpert",
            findings=tuple(findings), uncertain=tuple(uncertain), view=view, projection=projection,
            sex=_SEXES[row["Sex"]], age=int(row["Age"]) if row["Age"] else None, labels=tuple(labels)))
    if not records and skipped:
        raise no_usable_rows(csv_path, skipped)
    return ReadResult(records, skipped)
