"""CheXpert and NIH readers against hand-written tables, and the real NIH sample."""
import math
import os

import numpy as np
import pytest
from PIL import Image

from data_pipeline.chexpert import read_chexpert
from data_pipeline.nih import read_nih
from data_pipeline.records import CHEXPERT_OBSERVATIONS, NIH_FINDINGS

NIH_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "nih-cxr14-sample")
HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_OBSERVATIONS)


def write_image(path, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((40, 32), value, np.uint8)).save(path)


def chexpert_dir(tmp_path, rows, header=HEADER):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    (root / "train.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(root)


def obs(**values):
    """The 14 observation cells, blank unless given (keys with spaces written as underscores)."""
    return ",".join(values.get(o.replace(" ", "_"), "") for o in CHEXPERT_OBSERVATIONS)


def test_chexpert_rows_policies_and_filters(tmp_path):
    rows = [
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,63,Frontal,AP," + obs(Edema="-1.0", Pleural_Effusion="1.0", Cardiomegaly="0.0"),
        "CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg,Female,63,Lateral,," + obs(Edema="1.0"),
        "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Male,45,Frontal,PA," + obs(No_Finding="1.0"),
    ]
    root = chexpert_dir(tmp_path, rows)
    for r in rows:
        write_image(os.path.join(os.path.dirname(root), r.split(",")[0]))

    res = read_chexpert(root)
    assert res.skipped == [] and len(res.records) == 2          # lateral filtered out by default
    r0 = res.records[0]
    assert r0.image_path == os.path.realpath(os.path.join(root, "train/patient00001/study1/view1_frontal.jpg"))
    assert (r0.patient_id, r0.study_id, r0.sex, r0.age, r0.view, r0.projection) == \
        ("patient00001", "patient00001/study1", "female", 63, "frontal", "AP")
    assert r0.findings == ("pleural effusion",) and r0.uncertain == ("edema",)
    edema, effusion, cardio = (CHEXPERT_OBSERVATIONS.index(n) for n in ("Edema", "Pleural Effusion", "Cardiomegaly"))
    assert math.isnan(r0.labels[edema]) and r0.labels[effusion] == 1.0 and r0.labels[cardio] == 0.0
    assert math.isnan(r0.labels[0])                                   # blank stays blank
    assert res.records[1].findings == ("no finding",)

    zeros = read_chexpert(root, uncertainty="zeros").records[0]
    assert zeros.labels[edema] == 0.0 and zeros.uncertain == () and "edema" not in zeros.findings
    ones = read_chexpert(root, uncertainty="ones").records[0]
    assert ones.labels[edema] == 1.0 and ones.findings == ("edema", "pleural effusion")

    assert len(read_chexpert(root, views=("frontal", "lateral")).records) == 3
    assert [r.projection for r in read_chexpert(root, projections=("PA",)).records] == ["PA"]
    with pytest.raises(ValueError, match="uncertainty"):
        read_chexpert(root, uncertainty="maybe")


def test_chexpert_bad_rows_and_missing_images_are_skipped_and_named(tmp_path):
    good = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,63,Frontal,AP," + obs(Edema="1.0")
    rows = [good,
            "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Female,63,Frontal,AP," + obs(Edema="2.0"),
            "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Female,abc,Frontal,AP," + obs(),
            "CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg,Female,50,Sideways,AP," + obs(),
            "CheXpert-v1.0-small/train/patient00005/study1/view1_frontal.jpg,Female,50,Frontal,AP," + obs()]   # no file
    root = chexpert_dir(tmp_path, rows)
    write_image(os.path.join(os.path.dirname(root), good.split(",")[0]))
    res = read_chexpert(root)
    assert len(res.records) == 1 and len(res.skipped) == 4
    assert "train.csv:3" in res.skipped[0] and "Edema" in res.skipped[0]
    assert "bad Age" in res.skipped[1] and "Frontal/Lateral" in res.skipped[2]
    assert "patient00005" in res.skipped[3] and "missing" in res.skipped[3]
    assert "4 skipped" in res.summary() and "train.csv:3" in res.summary()


def test_chexpert_missing_columns_is_one_line_error(tmp_path):
    header = HEADER.replace(",Edema", "").replace("Sex,", "")
    root = chexpert_dir(tmp_path, [], header=header)
    with pytest.raises(ValueError) as e:
        read_chexpert(root)
    assert "missing required columns: Sex, Edema" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("path", ["CheXpert-v1.0-small/../secret/patient00001/study1/view1_frontal.jpg",
                                  "/etc/patient00001/study1/view1_frontal.jpg",
                                  "CheXpert-v1.0-small/train/../../x/patient00001/study1/view1_frontal.jpg"])
def test_chexpert_path_outside_root_is_refused(tmp_path, path):
    root = chexpert_dir(tmp_path, [f"{path},Female,63,Frontal,AP," + obs()])
    write_image(os.path.join(str(tmp_path), "secret/patient00001/study1/view1_frontal.jpg"))
    with pytest.raises(ValueError, match=r"train.csv:2.*refused"):
        read_chexpert(root)


def test_chexpert_symlink_escaping_root_is_refused(tmp_path):
    root = chexpert_dir(tmp_path, ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,63,Frontal,AP," + obs()])
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", os.path.join(root, "train"))
    with pytest.raises(ValueError, match="refused"):
        read_chexpert(root)


def test_chexpert_renamed_root_still_resolves(tmp_path):
    rel = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    root = tmp_path / "my_copy"
    root.mkdir()
    (root / "train.csv").write_text(HEADER + f"\n{rel},Male,30,Frontal,PA," + obs() + "\n")
    write_image(str(root / "train/patient00001/study1/view1_frontal.jpg"))
    assert read_chexpert(str(root)).records[0].image_path == str(root / "train/patient00001/study1/view1_frontal.jpg")


NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"


def test_nih_hand_written_table(tmp_path):
    rows = ["00000001_000.png,Cardiomegaly|Effusion,0,1,57,M,PA,2682,2749,0.143,0.143",
            "00000001_001.png,No Finding,1,1,58,M,AP,2500,2048,0.168,0.168",
            "00000002_000.png,Flu,0,2,40,F,PA,2500,2048,0.168,0.168",        # unknown finding
            "00000003_000.png,Mass,0,3,412,F,PA,2500,2048,0.168,0.168",       # impossible age -> None
            "00000004_000.png,Mass,0,4,40,F,PA,2500,2048,0.168,0.168",        # missing image
            "../../outside.png,Mass,0,5,40,F,PA,2500,2048,0.168,0.168"]
    (tmp_path / "Data_Entry_2017.csv").write_text(NIH_HEADER + "\n" + "\n".join(rows[:5]) + "\n")
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"):
        write_image(str(tmp_path / "images" / name))
    res = read_nih(str(tmp_path))
    assert [r.image_path.rsplit("/", 1)[1] for r in res.records] == ["00000001_000.png", "00000001_001.png", "00000003_000.png"]
    a, b, c = res.records
    assert a.findings == ("cardiomegaly", "pleural effusion") and a.sex == "male" and a.projection == "PA"
    assert a.labels == tuple(1.0 if n in ("Cardiomegaly", "Effusion") else 0.0 for n in NIH_FINDINGS)
    assert b.findings == ("no finding",) and b.study_id == "1/1" and a.patient_id == b.patient_id == "1"
    assert c.age is None
    assert len(res.skipped) == 2 and "'Flu'" in res.skipped[0] and "missing" in res.skipped[1]
    (tmp_path / "Data_Entry_2017.csv").write_text(NIH_HEADER + "\n" + rows[5] + "\n")
    with pytest.raises(ValueError, match="refused"):
        read_nih(str(tmp_path))
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\n")
    with pytest.raises(ValueError, match="missing required columns: Follow-up #, Patient ID"):
        read_nih(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(NIH_SAMPLE), reason=f"NIH sample not found at {NIH_SAMPLE}")
def test_nih_real_sample_matches_its_readme():
    res = read_nih(NIH_SAMPLE)
    assert len(res.records) == 1607 and res.skipped == []
    assert len({r.patient_id for r in res.records}) == 1283
    assert sum(r.projection == "PA" for r in res.records) == 938
    counts = {f: sum(f in r.findings for r in res.records) for f in ("no finding", "pneumonia", "hernia")}
    assert counts == {"no finding": 601, "pneumonia": 516, "hernia": 23}
