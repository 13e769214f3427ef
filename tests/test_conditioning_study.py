"""CFG vs no-CFG numbers against known answers: oracle models whose generations are known
(tests/oracle_model.py), a Fréchet distance recomputed by hand, a label classifier whose answer is
fixed by construction, paired differences of identical runs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle_model import oracle_loaded
from torch import nn

from data_pipeline.vocab import Vocabulary
from engine.audit.conditioning_study import StudyOptions, pixel_features, quantify_runs, study_prompts
from engine.audit.copy_detection import CopyDetector, CopyDetectorConfig
from engine.audit.frechet import frechet_distance_features
from engine.audit.label_classifier import LabelClassifier, LabelClassifierConfig
from engine.audit.run_data import RealImages

TOKENS = ("plant000", "ctrl000")
VOCAB = Vocabulary.default(extra_tokens=TOKENS)
BASE = "frontal AP chest x-ray, female, 60s"


def smooth(n: int, seed: int, size: int = 16) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 1, size + 4, size + 4, generator=g), 5, stride=1)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    return (x[:, 0] * 255).round().to(torch.uint8).numpy()


class MeanBrightness(nn.Module):
    """A 'classifier' whose edema logit is the image's mean brightness: its AUC is known by construction."""
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None] * self.scale


class Pixels(nn.Module):
    """A 'copy-detection embedding' that is the pixels themselves (Pearson correlation of pixels)."""
    def __init__(self):
        super().__init__()
        self.one = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x.flatten(1) * self.one


@pytest.fixture
def study():
    train = smooth(10, 0)
    heldout = smooth(12, 1)
    train_paths = [f"img{i}" for i in range(10)]
    manifest = {"planted": [{"token": "plant000", "image_path": "img2", "copies": 3}],
                "controls": [{"token": "ctrl000", "image_paths": ["img5", "img6"]}]}
    prompts = [f"{BASE} | plant000", f"{BASE}: edema | ctrl000", f"{BASE}: cardiomegaly | ctrl000",
               f"{BASE}: edema", f"{BASE}: pneumonia"]
    ids = {t: next(i for i in VOCAB.encode(f"{BASE} | {t}") if i not in VOCAB.encode(BASE)) for t in TOKENS}
    edema = next(i for i in VOCAB.encode(f"{BASE}: edema") if i not in VOCAB.encode(BASE))
    bright = np.full((16, 16), 220, np.uint8)
    bright[::2] = 200
    # CFG run: the planted prompt reproduces its source, edema prompts come out bright, others dark
    cfg_run = oracle_loaded({ids["plant000"]: train[2], edema: bright}, VOCAB, p_uncond=0.5)
    nocfg_run = oracle_loaded({edema: bright}, VOCAB, p_uncond=0.0)   # copies nothing
    real = RealImages(train, train_paths, heldout, [f"{BASE}: edema"] * 6 + [BASE] * 6)
    lc = LabelClassifier(MeanBrightness(), ["edema"], LabelClassifierConfig(min_count=1))
    det = CopyDetector(Pixels(), CopyDetectorConfig(backbone="tiny"), threshold=0.99)
    return dict(train_prompts=prompts, manifest=manifest, real=real, runs=[cfg_run, nocfg_run], lc=lc, det=det)


def test_study_prompts_keeps_every_planted_prompt_and_samples_the_rest(study):
    opts = StudyOptions(controls=1, ordinary=1)
    prompts, groups = study_prompts(study["train_prompts"] * 2, study["manifest"], opts)
    assert groups == ["planted", "control", "ordinary"]
    assert prompts[0].endswith("plant000")
    assert study_prompts(study["train_prompts"], study["manifest"], opts) == (prompts, groups)


def test_quantify_runs_known_answers(study):
    opts = StudyOptions(generations=2, steps=3, controls=2, ordinary=2, n_boot=100)
    q = quantify_runs(study["runs"], ["cfg", "nocfg"], [[1.0], [1.0]], study["real"], study["manifest"],
                      study["train_prompts"], copy_detector=study["det"], label_classifier=study["lc"], opts=opts)
    cfg, nocfg = q["results"]
    assert q["groups"] == ["planted", "control", "control", "ordinary", "ordinary"]
    # the CFG oracle copies its planted image every time; the no-CFG oracle never does
    assert cfg["planted_nearest_is_planted"]["mean"] == 1.0 and nocfg["planted_nearest_is_planted"]["mean"] == 0.0
    assert cfg["copy_rate"]["planted"]["mean"] == 1.0 and nocfg["copy_rate"]["planted"]["mean"] == 0.0
    d = nocfg["paired_vs_reference"]
    assert d["reference"] == "cfg w = 1"
    assert d["planted_nearest_is_planted"]["difference"] == -1.0
    # edema prompts come out bright and the classifier scores brightness: conformance 1 for both runs
    assert cfg["label_conformance"]["value"] == 1.0 and d["label_conformance_macro_auc"]["difference"] == 0.0
    # detection needs the null branch: measured for the CFG run only (one planted prompt is too few for
    # an AUC interval, so it reports that), refused with the reason for the other
    assert "not_applicable" in nocfg["detection"] and "p_uncond" in nocfg["detection"]["not_applicable"]
    assert cfg["detection"]["ci95"] == [None, None] and "fewer than 2" in cfg["detection"]["note"]
    # Fréchet distance recomputed by hand from the generations' 8x8 pixels
    from engine.audit.conditioning_study import generate_with_scores
    images, scores = generate_with_scores(study["runs"][0], q["prompts"], 1.0, opts, with_score=True)
    feats = pixel_features(images.reshape(-1, 16, 16))
    held = pixel_features(study["real"].heldout)
    assert cfg["frechet"]["pixels_8x8"]["value"] == pytest.approx(frechet_distance_features(feats, held), rel=1e-6)
    assert scores.shape == (5, 2, 3) and np.all(np.isfinite(scores))
