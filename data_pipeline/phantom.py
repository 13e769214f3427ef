"""Procedural chest radiograph phantoms whose visible anatomy follows CheXpert labels.

A phantom is a sum of tissue densities on a normalized body grid (x in [-1, 1] left->right of the
image, y in [0, 1] from the shoulders to the upper abdomen); dense tissue is bright, air dark, as on
a radiograph. The patient's right is the image's left (standard PA/AP display), so the heart sits
slightly to the image's right. Everything is vectorized numpy on the full grid: a 320x400 phantom
takes 30-50 ms, a 64 px one 2-4 ms.

Patients differ as much as real ones do (`Anatomy`): habitus and soft tissue, shoulders, arms,
breasts, lung shape, diaphragm height, heart size and position, mediastinum, rib spacing, angle and
contrast, clavicles, spine. Each radiograph of a patient differs again (`Study`): position, zoom
and rotation on the detector, depth of inspiration, exposure and windowing, a heel-effect gradient,
film grain, collimation borders and burned-in L/R markers and text boxes. How much is calibrated,
not measured from anatomy: the ranges were set so that the nearest-other-image pixel correlation of
distinct phantoms matches the NIH ChestX-ray14 sample's at 32 and 64 px (data_pipeline/
dataset_stats.py; the figures are in tests/test_data_synthetic.py), a few percent of studies being
badly positioned or washed out, as the real sample's least typical images are.

What each label draws (strength 1 for a positive label, 0.5 for an uncertain one drawn):
    Cardiomegaly               heart wider than half the thorax (cardiothoracic ratio 0.56-0.74)
    Enlarged Cardiomediastinum widened upper mediastinum
    Pleural Effusion           basal fluid with a meniscus, blunting the costophrenic angle
    Pneumothorax               lateral-apical rim without lung markings, with a visceral pleural line
    Consolidation              dense patchy blobs; Lung Opacity: fainter, more diffuse patches
    Pneumonia                  patchy lower-zone opacity; Atelectasis: plate-like basal band
    Edema                      bilateral perihilar haze with septal (Kerley) lines
    Lung Lesion                one round nodule or mass; Pleural Other: lateral pleural thickening
    Fracture                   a stepped, interrupted rib; Support Devices: tubes/lines, ECG leads
Study parameters are drawn before any finding and the display window is set on the anatomy without
findings, so one patient and study seed rendered with and without a finding differ only where the
finding is drawn (a large heart or wide mediastinum, being anatomy, also shifts the window slightly).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One patient's body: fixed across that patient's studies."""
    aspect: float          # height / width of the image
    body_half_width: float  # trunk half-width (> 1: the trunk is wider than the detector)
    soft_tissue: float     # soft-tissue density (habitus: thin ~0.3, obese ~0.55)
    neck_half_width: float
    shoulder_level: float  # y of the shoulder line
    arms: float            # arm density beside the trunk (0: arms raised / out of the field)
    arm_gap: float
    breasts: float         # breast shadow density (0 for most men)
    lung_x: float          # distance of each lung's centre from the midline
    lung_a: float          # lung half-width
    lung_top: float
    lung_power: float      # superellipse exponent of the lung outline (2: ellipse; lower: more pointed)
    apex_taper: float      # lung width at the apex relative to the base
    lung_darkness: float   # how much air darkens the lung fields (emphysematous: high)
    diaphragm: float       # right dome level (the left is lower by diaphragm_step)
    diaphragm_step: float
    dome_height: float
    ctr: float             # cardiothoracic ratio of the healthy heart
    heart_shift: float     # heart centre offset to the patient's left
    midline_shift: float   # scoliosis / mediastinal shift: how far spine, mediastinum and heart bow sideways
    heart_density: float
    mediastinum: float     # upper mediastinum width
    aortic_knob: float
    rib_spacing: float
    rib_curve: float
    rib_tilt: float        # posterior ribs fall laterally by this much per unit x
    rib_contrast: float
    clavicle_level: float
    clavicle_slope: float
    spine_density: float
    gastric_bubble: float  # size of the stomach's air bubble under the left dome (0: none)
    exposure: float        # patient-specific attenuation scale (body thickness)
    texture_seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator, sex: str | None = None) -> "Anatomy":
        """A random patient; `sex` ("female"/"male") decides breast shadows, None draws it."""
        female = rng.random() < 0.5 if sex is None else sex.lower() == "female"
        return cls(
            aspect=rng.uniform(1.0, 1.25), body_half_width=rng.uniform(0.72, 1.08),
            soft_tissue=rng.uniform(0.30, 0.55),
            neck_half_width=rng.uniform(0.12, 0.22), shoulder_level=rng.uniform(-0.02, 0.14),
            arms=rng.uniform(0.2, 0.5) * (rng.random() < 0.5), arm_gap=rng.uniform(0.02, 0.12),
            breasts=rng.uniform(0.05, 0.18) * (female and rng.random() < 0.85),
            lung_x=rng.uniform(0.38, 0.48), lung_a=rng.uniform(0.23, 0.34), lung_top=rng.uniform(0.06, 0.17),
            lung_power=rng.uniform(1.6, 2.6), apex_taper=rng.uniform(0.45, 0.9), lung_darkness=rng.uniform(0.20, 0.38),
            diaphragm=rng.uniform(0.66, 0.84), diaphragm_step=rng.uniform(0.0, 0.06), dome_height=rng.uniform(0.03, 0.10),
            ctr=rng.uniform(0.38, 0.50), heart_shift=rng.uniform(-0.05, 0.08),
            midline_shift=rng.uniform(-0.12, 0.12) * (rng.random() < 0.15), heart_density=rng.uniform(0.04, 0.14),
            mediastinum=rng.uniform(0.13, 0.22), aortic_knob=rng.uniform(0.0, 0.12),
            rib_spacing=rng.uniform(0.065, 0.095), rib_curve=rng.uniform(0.15, 0.55), rib_tilt=rng.uniform(-0.05, 0.25),
            rib_contrast=rng.uniform(0.03, 0.10), clavicle_level=rng.uniform(0.04, 0.16),
            clavicle_slope=rng.uniform(-0.25, 0.15), spine_density=rng.uniform(0.05, 0.16),
            gastric_bubble=rng.uniform(0.03, 0.09) * (rng.random() < 0.6),
            exposure=rng.uniform(0.8, 1.25), texture_seed=int(rng.integers(2**31)))


SPREAD_OUTLIER_RATE = 0.2
WASHED_OUT_RATE = 0.12


@dataclasses.dataclass(frozen=True)
class Study:
    """How one radiograph was taken: positioning, breathing, exposure and what the scanner burned in."""
    shift_x: float         # body centre on the detector (image x units)
    shift_y: float
    scale: float           # > 1: the body fills more of the image
    rotation: float        # radians, counter-clockwise on the display
    inspiration: float     # added to the diaphragm level (deeper breath: lower domes)
    gain: float            # attenuation scale of this exposure
    window_low: float      # display window: the quantiles of the anatomy's exposure shown as black and white
    window_high: float     # (auto-windowing on the histogram, so the lung fields are never clipped away)
    gamma: float
    background: float      # floor of the display range
    gradient: float        # heel effect: brightness slope across the image
    gradient_angle: float
    grain: float           # quantum noise std
    unsharpness: float     # blur of the anatomy, in image widths: the analytic shapes' edges are sharper than
                           # anatomy's (without it phantoms decorrelate more than radiographs from 32 to 64 px)
    borders: tuple[float, float, float, float]   # collimation/scan borders: top, bottom, left, right (image fraction)
    border_value: float
    marker: str            # "L", "R" or "" (burned-in side marker)
    marker_corner: int     # 0..3: top-left, top-right, bottom-left, bottom-right
    text_box: bool         # a burned-in annotation box
    text_corner: int
    overlay_seed: int      # markers' and grain's own generator: identical with and without findings

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Study":
        # A minority of studies is badly positioned (bedside, uncooperative patient): twice the spread.
        spread = 2.0 if rng.random() < SPREAD_OUTLIER_RATE else 1.0
        washed_out = rng.random() < WASHED_OUT_RATE   # over-bright display: whites clipped, lungs grey
        border_on = rng.random(4) < (0.35, 0.2, 0.3, 0.3)
        borders = tuple(float(w) for w in np.where(border_on, rng.uniform(0.01, 0.09, 4), 0.0))
        return cls(
            shift_x=rng.uniform(-0.09, 0.09) * spread, shift_y=rng.uniform(-0.06, 0.06) * spread,
            scale=float(np.exp(rng.uniform(-0.13, 0.15) * spread)),
            rotation=float(np.clip(rng.normal(0.0, 0.05), -0.14, 0.14)) * spread, inspiration=rng.uniform(-0.05, 0.05),
            gain=rng.uniform(1.2, 2.8), window_low=rng.uniform(0.0, 0.04),
            window_high=rng.uniform(0.80, 0.92) if washed_out else rng.uniform(0.96, 1.0),
            gamma=rng.uniform(0.35, 0.6) if washed_out else rng.uniform(0.7, 1.4),
            background=rng.uniform(0.0, 0.15) * (rng.random() < 0.4),
            gradient=rng.uniform(0.0, 0.15), gradient_angle=rng.uniform(0, 2 * np.pi), grain=rng.uniform(0.003, 0.015),
            unsharpness=rng.uniform(0.008, 0.022),
            borders=borders, border_value=rng.uniform(0.85, 1.0) if rng.random() < 0.15 else rng.uniform(0.0, 0.08),
            marker=("L", "R", "")[int(rng.choice(3, p=(0.35, 0.35, 0.3)))], marker_corner=int(rng.integers(4)),
            text_box=bool(rng.random() < 0.3), text_corner=int(rng.integers(4)), overlay_seed=int(rng.integers(2**31)))


class Frame:
    """Pixel grid <-> body coordinates for one study (shift, zoom, rotation on the detector).

    Body x spans [-1, 1] over the image width and body y one width-unit per image width, so the
    rotation is done in isotropic units (x, 2y) and mapped back.
    """

    def __init__(self, width: int, aspect: float, study: Study):
        self.width, self.height = width, int(round(width * aspect))
        self.study = study
        ix = np.linspace(-1, 1, self.width, dtype=np.float32)[None, :]
        iy = ((np.linspace(0, 1, self.height, dtype=np.float32) - 0.5) * aspect)[:, None]
        self.ix, self.iy = ix, iy                         # image coordinates, centre 0
        c, s = np.cos(study.rotation), np.sin(study.rotation)
        xr, yr = (ix - study.shift_x) / study.scale, 2 * (iy - study.shift_y) / study.scale
        self.X = (c * xr + s * yr).astype(np.float32)
        self.Y = ((-s * xr + c * yr) / 2 + 0.5).astype(np.float32)
        self.aspect = aspect

    def to_pixels(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of body-coordinate points [K, 2] (x, y)."""
        st = self.study
        c, s = np.cos(st.rotation), np.sin(st.rotation)
        x, yi = points[:, 0], 2 * (points[:, 1] - 0.5)
        xr, yr = c * x - s * yi, s * x + c * yi
        ix, iy = xr * st.scale + st.shift_x, (yr * st.scale) / 2 + st.shift_y
        return (iy / self.aspect + 0.5) * (self.height - 1), (ix + 1) / 2 * (self.width - 1)


def _ramp(v: np.ndarray, width: float) -> np.ndarray:
    """Soft step 0 -> 1 as v goes from -width/2 to +width/2 (cheaper than a sigmoid)."""
    return np.clip(v / width + 0.5, 0.0, 1.0)


def _blob(X, Y, x0, y0, rx, ry) -> np.ndarray:
    return np.exp(-(((X - x0) / rx) ** 2 + ((Y - y0) / ry) ** 2))


def _draw_path(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, width_px: float) -> np.ndarray:
    """A soft line of about `width_px` through the polyline (rows, cols) in pixel coordinates.

    Rasterized by splatting densely resampled points and blurring: much cheaper than a distance
    field over the whole image.
    """
    seg = np.hypot(np.diff(rows), np.diff(cols))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, arc[-1], max(int(arc[-1] * 2), 2))
    r = np.round(np.interp(t, arc, rows)).astype(int)
    c = np.round(np.interp(t, arc, cols)).astype(int)
    keep = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
    mask = np.zeros(shape, np.float32)
    mask[r[keep], c[keep]] = 1.0
    sigma = max(width_px / 2.0, 0.6)
    return np.clip(gaussian_filter(mask, sigma) * np.sqrt(2 * np.pi) * sigma * 1.2, 0.0, 1.0)


def _bezier(p0, p1, p2, n: int = 16) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t ** 2 * np.asarray(p2)


def _trunk(a: Anatomy, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(soft-tissue path length 0..1, trunk mask) of neck, shoulders and trunk; arms beside it."""
    # Half-width grows from the neck to the trunk over the shoulders' rounded slope.
    rise = np.clip((Y - a.shoulder_level + 0.12) / 0.12, 0.0, 1.0)
    half = a.neck_half_width + (a.body_half_width - a.neck_half_width) * np.sqrt(rise)
    inside = np.clip(1 - (X / half) ** 2, 0.0, 1.0)
    trunk = _ramp(half - np.abs(X), 0.04)
    thickness = np.sqrt(inside) * trunk
    if a.arms > 0:
        arm_x = np.abs(X) - a.body_half_width - a.arm_gap - 0.11
        arm = np.sqrt(np.clip(1 - (arm_x / 0.11) ** 2, 0.0, 1.0)) * _ramp(Y - a.shoulder_level - 0.02, 0.06)
        thickness = thickness + a.arms / max(a.soft_tissue, 1e-3) * arm
    return thickness, trunk


def render_frontal(anatomy: Anatomy, findings: dict[str, float], rng: np.random.Generator, width: int) -> np.ndarray:
    """uint8 [H, W] frontal radiograph; `findings` maps CheXpert observation -> strength (0..1)."""
    a = anatomy
    study = Study.sample(rng)          # first: findings must not change how the study was taken
    frame = Frame(width, a.aspect, study)
    X, Y, height = frame.X, frame.Y, frame.height
    f = findings.get
    diaphragm = a.diaphragm + study.inspiration

    thickness, trunk = _trunk(a, X, Y)
    density = a.soft_tissue * thickness
    if a.breasts > 0:   # soft lower-lateral shadows with a sharp inferior edge
        for side in (-1, 1):
            fold = diaphragm + 0.02 - 0.12 * ((X - side * 0.45) / 0.35) ** 2
            density += a.breasts * _blob(X, Y, side * 0.45, diaphragm - 0.12, 0.35, 0.3) * _ramp(fold - Y, 0.03) * trunk

    # Heart: half-width = CTR x half the thoracic width. It displaces the lung in front of it.
    ax = np.abs(X)
    M = X - a.midline_shift * np.sin(np.pi * np.clip(Y, 0.0, 1.0))   # x from the (possibly bowed) midline
    am = np.abs(M)
    ctr = a.ctr + (rng.uniform(0.18, 0.24) if f("Cardiomegaly", 0.0) else 0.0) * f("Cardiomegaly", 0.0)
    half_w = ctr * (a.lung_x + a.lung_a)
    heart_y = diaphragm + 0.5 * a.diaphragm_step - 0.1
    heart = _ramp(1 - (((M - a.heart_shift - 0.3 * half_w) / half_w) ** 2 + ((Y - heart_y) / 0.17) ** 2), 0.15)
    density += a.heart_density * heart

    # Lungs: superellipses narrowing to the apex, cut below by the diaphragm domes (costophrenic angles).
    texture_rng = np.random.default_rng(a.texture_seed)   # the patient's own vessel pattern
    vessels = gaussian_filter(texture_rng.standard_normal((height, width)).astype(np.float32), 2.0 * width / 320)
    vessels /= vessels.std() + 1e-6
    markings = np.zeros((height, width), np.float32)
    lungs = np.zeros((height, width), np.float32)
    lung_info, domes = {}, {}
    mediastinum = a.mediastinum * (1.0 + 0.9 * f("Enlarged Cardiomediastinum", 0.0))
    for side in (-1, 1):   # -1: patient's right (image left)
        cx = side * a.lung_x
        dome_level = diaphragm + (a.diaphragm_step if side > 0 else 0.0)
        cy, b = (a.lung_top + dome_level) / 2, (dome_level - a.lung_top) / 2 * 1.15
        depth = np.clip((Y - a.lung_top) / (dome_level - a.lung_top), 0.0, 1.0)
        half = a.lung_a * (a.apex_taper + (1 - a.apex_taper) * np.sqrt(depth))
        e = np.abs((X - cx) / half) ** a.lung_power + np.abs((Y - cy) / b) ** a.lung_power
        dome = dome_level - a.dome_height * np.exp(-((X - cx) / (0.8 * a.lung_a)) ** 2)
        domes[side] = dome
        lung = _ramp(1 - e, 0.12) * _ramp(dome - Y, 0.015)
        lung *= _ramp(am - mediastinum / 2 * (Y < 0.45), 0.03) * (1 - 0.8 * heart)   # mediastinum, heart
        hilum = np.exp(-(((X - side * 0.2) / 0.25) ** 2 + ((Y - 0.45) / 0.25) ** 2))
        lung_info[side] = (cx, cy, b, e, dome_level)
        lungs += lung
        markings += lung * (0.35 + 0.65 * hilum)
    density -= a.lung_darkness * lungs * (0.7 + 0.3 * np.clip((Y - a.lung_top) / 0.3, 0, 1))

    # Pneumothorax: a lateral-apical rim of the lung with no vessels, darker, edged by a pleural line.
    lesions = np.zeros((height, width), np.float32)   # findings' densities, kept out of the display window
    ptx = f("Pneumothorax", 0.0)
    if ptx > 0:
        side = rng.choice((-1, 1))
        cx, cy, b, e, _ = lung_info[side]
        rim_start = rng.uniform(0.45, 0.65)
        where = (side * (X - cx) > -0.3 * a.lung_a) * (Y < cy + 0.15)
        outer = _ramp(e - rim_start, 0.02) * _ramp(1 - e, 0.05) * where
        lesions -= ptx * outer * (0.16 + 0.035 * markings * vessels)
        lesions += 0.15 * ptx * np.exp(-((e - rim_start) / 0.015) ** 2) * where
    density += 0.035 * markings * vessels

    # Ribs: curved posterior ribs falling laterally, fainter anterior ribs rising; a fracture is a stepped gap.
    rib_phase = (Y - a.rib_tilt * ax - a.rib_curve * (ax - 0.15) ** 2) / a.rib_spacing
    if f("Fracture", 0.0) > 0:
        x0, y0 = rng.choice((-1, 1)) * rng.uniform(0.45, 0.7), rng.uniform(0.3, 0.6)
        window = (np.abs(Y - y0) < 0.08) & (np.abs(X - x0) < 0.15)
        rib_phase = rib_phase + 0.45 * f("Fracture") * (window & (X > x0))
        gap = np.exp(-((X - x0) / 0.012) ** 2) * window
    else:
        gap = 0.0
    cage = (_ramp(a.lung_x + a.lung_a + 0.06 - ax, 0.05) * _ramp(Y - a.lung_top + 0.05, 0.05)
            * _ramp(diaphragm + 0.04 - Y, 0.04))
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * rib_phase)) ** 6 * (1 - 0.8 * gap)
    anterior = (0.5 + 0.5 * np.cos(2 * np.pi * (Y + 0.35 * ax) / (1.3 * a.rib_spacing))) ** 4
    density += a.rib_contrast * (ribs + 0.35 * anterior) * cage
    density += a.spine_density * _ramp(0.05 - am, 0.02) * trunk * (0.85 + 0.15 * np.cos(2 * np.pi * Y / 0.07))

    # Clavicles: bright bars from the sternal notch out to the shoulders.
    clav_y = a.clavicle_level + a.clavicle_slope * (ax - 0.05) + 0.025 * np.sin(np.pi * ax / 0.6)
    density += 0.16 * np.exp(-((Y - clav_y) / 0.02) ** 2) * _ramp(ax - 0.06, 0.03) * _ramp(0.65 - ax, 0.06)

    # Upper mediastinum, aortic knob, and the trachea's air column down to the carina.
    density += 0.12 * _ramp(mediastinum / 2 - am, 0.04) * _ramp(heart_y - Y, 0.1) * _ramp(Y - a.lung_top + 0.1, 0.1)
    density += 0.15 * _blob(M, Y, 0.12, a.lung_top + 0.2, a.aortic_knob + 1e-3, 0.04)
    carina = a.lung_top + 0.2
    density -= 0.12 * _ramp(0.035 - am, 0.02) * _ramp(carina - Y, 0.04) * trunk

    # Diaphragm/abdomen below the domes, the stomach's air under the left one.
    density += 0.20 * _ramp(Y - np.where(X < 0, domes[-1], domes[1]) - 0.01, 0.03) * trunk
    if a.gastric_bubble > 0:
        bubble_y = diaphragm + a.diaphragm_step + 0.06
        density -= 0.12 * _blob(X, Y, a.lung_x, bubble_y, a.gastric_bubble * 1.5, a.gastric_bubble)

    # The display window is set on the anatomy alone (as auto-windowing is on the patient), so a
    # finding changes its own pixels, not the brightness of the whole image.
    anatomy_density = density * a.exposure
    density = density + lesions

    # Pleural effusion: fluid filling the base, meniscus climbing laterally.
    eff = f("Pleural Effusion", 0.0)
    if eff > 0:
        sides = (-1, 1) if rng.random() < 0.4 else (rng.choice((-1, 1)),)
        for side in sides:
            cx, cy, b, e, dome_level = lung_info[side]
            level = dome_level - rng.uniform(0.07, 0.2) * (0.5 + 0.5 * eff)
            lateral = np.clip(side * (X - cx) / a.lung_a, -1, 1.2)
            meniscus = level - 0.08 * np.clip(lateral, 0, None) ** 2
            fluid = _ramp(Y - meniscus, 0.03) * _ramp(1.0 - e, 0.08) * _ramp(domes[side] + 0.01 - Y, 0.03)   # above the dome
            density += 0.34 * eff * fluid

    # Patchy parenchymal opacities.
    def patches(count, strength, rx, zone, name):
        s = f(name, 0.0)
        if s <= 0:
            return 0.0
        out = np.zeros((height, width), np.float32)
        for _ in range(count):
            side = rng.choice((-1, 1))
            x0 = side * a.lung_x + rng.uniform(-0.6, 0.6) * a.lung_a
            y0 = rng.uniform(*zone)
            out += _blob(X, Y, x0, y0, rx * rng.uniform(0.7, 1.3), rx * rng.uniform(0.7, 1.3))
        mottle = 0.6 + 0.4 * np.clip(vessels * 0.5 + rng.standard_normal() * 0.1, -1, 1)
        return strength * s * np.clip(out, 0, 1) * mottle * lungs

    density += patches(int(rng.integers(1, 3)), 0.40, 0.12, (0.35, 0.7), "Consolidation")
    density += patches(int(rng.integers(2, 5)), 0.22, 0.11, (0.25, 0.7), "Lung Opacity")
    density += patches(int(rng.integers(1, 3)), 0.32, 0.11, (0.55, 0.72), "Pneumonia")
    if f("Atelectasis", 0.0) > 0:
        side = rng.choice((-1, 1))
        x0, y0, tilt = side * a.lung_x, diaphragm - rng.uniform(0.08, 0.15), rng.uniform(-0.25, 0.25)
        plate = np.exp(-((Y - y0 - tilt * (X - x0)) / 0.03) ** 2) * (np.abs(X - x0) < a.lung_a * 0.8)
        density += 0.30 * f("Atelectasis") * plate * lungs
    if f("Edema", 0.0) > 0:
        haze = np.exp(-(((ax - 0.25) / 0.2) ** 2 + ((Y - 0.5) / 0.22) ** 2))
        kerley = (np.cos(2 * np.pi * Y / 0.02) > 0.85) * (ax > a.lung_x + 0.4 * a.lung_a) * (Y > diaphragm - 0.2)
        density += f("Edema") * (0.22 * haze + 0.08 * kerley) * lungs
    if f("Lung Lesion", 0.0) > 0:
        side = rng.choice((-1, 1))
        x0, y0, r = side * a.lung_x + rng.uniform(-0.4, 0.4) * a.lung_a, rng.uniform(0.25, 0.6), rng.uniform(0.04, 0.09)
        density += 0.35 * f("Lung Lesion") * _ramp(1 - np.hypot(X - x0, Y - y0) / r, 0.2)
    if f("Pleural Other", 0.0) > 0:
        side = rng.choice((-1, 1))
        cx, cy, b, e, _ = lung_info[side]
        band = _ramp(e - 0.65, 0.05) * _ramp(1.05 - e, 0.05) * (side * (X - cx) > 0)
        density += 0.25 * f("Pleural Other") * band

    # Support devices: radiopaque tubes and lines, ECG electrodes (sharp-edged: not blurred with the anatomy).
    metal = 0.0
    if f("Support Devices", 0.0) > 0:
        metal = 0.8 * f("Support Devices") * _devices(frame, diaphragm, rng)

    return _expose(density * a.exposure, anatomy_density, frame, study, sharp=metal)


def _devices(frame: Frame, diaphragm: float, rng: np.random.Generator) -> np.ndarray:
    """0..1 map of devices: 0-2 of endotracheal tube, central line, nasogastric tube, and usually ECG electrodes.

    Monitored patients nearly always wear ECG electrodes; the tubes alone mostly run over the bright
    midline, where they are hard to see at low resolution.
    """
    X, Y = frame.X, frame.Y
    devices = np.zeros((frame.height, frame.width), np.float32)
    px = 2.0 / frame.width / frame.study.scale   # one pixel in body units (x)
    kinds = list(rng.permutation(3)[: int(rng.integers(0, 3))])
    if not kinds or rng.random() < 0.75:
        kinds.append(3)
    for kind in kinds:
        if kind == 0:    # endotracheal tube down the midline
            path = np.array([[rng.uniform(-0.03, 0.03), -0.05], [rng.uniform(-0.02, 0.02), rng.uniform(0.22, 0.32)]])
            width_line = 0.022
        elif kind == 1:  # central venous line from a shoulder into the superior vena cava
            start = (rng.choice((-1, 1)) * rng.uniform(0.45, 0.6), 0.08)
            path = _bezier(start, (start[0] * 0.3, 0.15), (-0.06, rng.uniform(0.38, 0.48)))
            width_line = 0.009
        elif kind == 2:  # nasogastric tube down to below the diaphragm
            path = _bezier((0.0, -0.05), (-0.04, 0.5), (0.2, diaphragm + 0.12))
            width_line = 0.012
        else:            # ECG electrodes: bright discs about 2 cm across, each with its lead running off the film
            for _ in range(int(rng.integers(2, 5))):
                x0, y0 = rng.uniform(-0.7, 0.7), rng.uniform(0.1, 0.8)
                devices += _ramp(1 - np.hypot(X - x0, 2 * (Y - y0)) / 0.05, 0.3)
                end = (np.sign(x0) * 1.4, y0 + rng.uniform(-0.4, 0.4))
                lead = _bezier((x0, y0), (x0 + rng.uniform(-0.3, 0.3), y0 + rng.uniform(-0.3, 0.3)), end)
                rows, cols = frame.to_pixels(lead)
                devices += 0.7 * _draw_path((frame.height, frame.width), rows, cols, 2 * 0.007 / px)
            continue
        rows, cols = frame.to_pixels(path)
        devices += _draw_path((frame.height, frame.width), rows, cols, 2 * width_line / px)
    return np.clip(devices, 0, 1)


def render_lateral(anatomy: Anatomy, findings: dict[str, float], rng: np.random.Generator, width: int) -> np.ndarray:
    """A simpler lateral view: one lung field, the spine behind, the heart in front."""
    a = anatomy
    study = Study.sample(rng)
    frame = Frame(width, a.aspect, study)
    X, Y = frame.X, frame.Y
    diaphragm = a.diaphragm + study.inspiration
    body = _ramp(0.85 - np.abs(X), 0.05) * _ramp(Y - 0.02, 0.04)
    lung = _ramp(1 - ((X / 0.6) ** 2 + ((Y - 0.45) / 0.4) ** 2), 0.08) * _ramp(diaphragm - Y, 0.02)
    heart = _blob(X, Y, -0.35, diaphragm - 0.15, 0.3 + 0.15 * findings.get("Cardiomegaly", 0.0), 0.2)
    spine = _ramp(0.08 - np.abs(X - 0.62), 0.03) * (np.cos(2 * np.pi * Y / 0.06) * 0.3 + 0.7)
    density = (a.soft_tissue + 0.05) * body - a.lung_darkness * lung + 0.28 * heart * lung + 2 * a.spine_density * spine
    anatomy_density = density * a.exposure
    if findings.get("Pleural Effusion", 0.0) > 0:
        density += 0.3 * findings["Pleural Effusion"] * _ramp(Y - (diaphragm - 0.1 - 0.1 * X), 0.03) * lung
    return _expose(density * a.exposure, anatomy_density, frame, study)


# 5x7 bitmaps of the burned-in side markers.
_GLYPHS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
}


def _stamp(image: np.ndarray, patch: np.ndarray, corner: int, margin: int, value: float) -> None:
    """Burn `patch` (0..1 coverage) into a corner of `image` at display level `value`, in place."""
    h, w = patch.shape
    r0 = margin if corner in (0, 1) else image.shape[0] - margin - h
    c0 = margin if corner in (0, 2) else image.shape[1] - margin - w
    if r0 < 0 or c0 < 0 or r0 + h > image.shape[0] or c0 + w > image.shape[1]:
        return
    region = image[r0:r0 + h, c0:c0 + w]
    region += patch * (value - region)


def _resized(bitmap: np.ndarray, height: int, width: int) -> np.ndarray:
    img = Image.fromarray((bitmap * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255


def _expose(density: np.ndarray, window_density: np.ndarray, frame: Frame, study: Study,
            sharp: np.ndarray | float = 0.0) -> np.ndarray:
    """Density -> 8-bit radiograph: blur, exposure, display window, heel effect, borders, markers, grain.

    `density` is blurred by the study's unsharpness (the analytic shapes' edges are sharper than
    anatomy's), `sharp` (metal) is not. The display window maps quantiles of `window_density`'s
    exposure (the anatomy without findings) to black and white.
    """
    st = study
    sigma = st.unsharpness * frame.width
    # Film-like response (saturating in dense tissue instead of clipping it), then the display window.
    exposure = 1 - np.exp(-st.gain * np.clip(gaussian_filter(density, sigma) + sharp, 0, None))
    low, high = np.quantile(1 - np.exp(-st.gain * np.clip(gaussian_filter(window_density, sigma), 0, None)),
                            (st.window_low, st.window_high))
    image = np.clip((exposure - low) / max(high - low, 1e-3), 0, 1) ** st.gamma
    image = st.background + (1 - st.background) * image
    image = image * (1 + st.gradient * (np.cos(st.gradient_angle) * frame.ix + np.sin(st.gradient_angle) * frame.iy))
    h, w = image.shape
    top, bottom, left, right = (int(round(b * n)) for b, n in zip(st.borders, (h, h, w, w)))
    for rows, cols in ((slice(0, top), slice(None)), (slice(h - bottom, h), slice(None)),
                       (slice(None), slice(0, left)), (slice(None), slice(w - right, w))):
        image[rows, cols] = st.border_value
    overlay = np.random.default_rng(st.overlay_seed)
    margin = max(1, int(round(0.03 * w)))
    if st.marker:
        glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[st.marker]], np.float32)
        size = max(4, int(round(w * overlay.uniform(0.04, 0.08))))
        _stamp(image, _resized(glyph, size, max(3, size * 5 // 7)), st.marker_corner, margin, overlay.uniform(0.85, 1.0))
    if st.text_box:
        bh, bw = max(3, int(round(h * overlay.uniform(0.04, 0.08)))), max(6, int(round(w * overlay.uniform(0.15, 0.35))))
        text = (overlay.random((3, 12)) < 0.6).astype(np.float32)
        box = np.ones((bh, bw), np.float32) * 0.35 + 0.65 * _resized(text, bh, bw)
        _stamp(image, box, st.text_corner, margin, overlay.uniform(0.8, 1.0))
    image = image + overlay.normal(0.0, st.grain, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
