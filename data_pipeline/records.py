"""The one record every dataset reader produces, so the engine never cares which dataset it is."""
from __future__ import annotations

import dataclasses

# CheXpert's 14 observations, in the column order of train.csv / valid.csv.
CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)

# NIH ChestX-ray14's 14 findings as spelled in `Finding Labels` ("No Finding" is the empty set).
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)

# Dataset label -> canonical lower-case finding name. NIH "Effusion" is the same concept as
# CheXpert "Pleural Effusion", so both map to one token and one prompt word.
_NIH_TO_CANONICAL = {name: name.lower().replace("_", " ") for name in NIH_FINDINGS}
_NIH_TO_CANONICAL["Effusion"] = "pleural effusion"


def canonical_finding(name: str) -> str:
    """Canonical lower-case name of a CheXpert observation or NIH finding."""
    if name in _NIH_TO_CANONICAL:
        return _NIH_TO_CANONICAL[name]
    return name.strip().lower().replace("_", " ")


# The union of both datasets' findings in a fixed order (CheXpert first, then NIH-only findings):
# this order fixes the vocabulary ids, so it must never be reordered, only appended to.
CANONICAL_FINDINGS: tuple[str, ...] = tuple(dict.fromkeys(
    [canonical_finding(n) for n in CHEXPERT_OBSERVATIONS] + [canonical_finding(n) for n in NIH_FINDINGS]
))


@dataclasses.dataclass(frozen=True)
class XrayRecord:
    image_path: str                 # absolute path of the image file
    patient_id: str
    study_id: str
    dataset: str                    # "chexpert" | "nih" | "synthetic"
    findings: tuple[str, ...]       # positive findings, canonical lower-case names
    uncertain: tuple[str, ...]      # uncertain findings (CheXpert -1 under the "ignore" policy)
    view: str                       # "frontal" | "lateral"
    projection: str                 # "AP" | "PA" | "LL" | "RL" | ""
    sex: str                        # "female" | "male" | "unknown"
    age: int | None
    labels: tuple[float, ...]       # dataset's own label order; nan = blank / ignored
    extra_tokens: tuple[str, ...] = ()

    def with_extra_tokens(self, tokens: tuple[str, ...]) -> "XrayRecord":
        return dataclasses.replace(self, extra_tokens=tuple(self.extra_tokens) + tuple(tokens))


@dataclasses.dataclass
class ReadResult:
    """What a reader returns: the usable records and the rows it skipped (with the reason)."""
    records: list[XrayRecord]
    skipped: list[str]              # "file:row: path: reason" for each skipped row

    def summary(self, first: int = 3) -> str:
        text = f"{len(self.records)} records, {len(self.skipped)} skipped"
        if self.skipped:
            text += " (first: " + "; ".join(self.skipped[:first]) + ")"
        return text


def age_bucket(age: int | None) -> str | None:
    """Age decade used in prompts ("60s"); 90 and above fold into "90s"."""
    if age is None:
        return None
    return f"{min(max(int(age), 0), 90) // 10 * 10}s"
