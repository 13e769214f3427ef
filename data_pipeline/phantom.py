"""Procedural chest radiograph phantoms whose visible anatomy follows CheXpert labels.

A phantom is a sum of tissue densities on a normalized grid (x in [-1, 1] left->right of the image,
y in [0, 1] top->bottom); dense tissue is bright, air dark, as on a radiograph. The patient's right
is the image's left (standard PA/AP display), so the heart sits slightly to the image's right.
Everything is vectorized numpy on the full grid: a 320x400 phantom takes a few milliseconds.

What each label draws (strength 1 for a positive label, 0.5 for an uncertain one drawn):
    Cardiomegaly               heart wider than half the thorax (cardiothoracic ratio 0.58-0.68)
    Enlarged Cardiomediastinum widened upper mediastinum
    Pleural Effusion           basal fluid with a meniscus, blunting the costophrenic angle
    Pneumothorax               lateral-apical rim without lung markings, with a visceral pleural line
    Consolidation              dense patchy blobs; Lung Opacity: fainter, more diffuse patches
    Pneumonia                  patchy lower-zone opacity; Atelectasis: plate-like basal band
    Edema                      bilateral perihilar haze with septal (Kerley) lines
    Lung Lesion                one round nodule; Pleural Other: lateral pleural thickening
    Fracture                   a stepped, interrupted rib; Support Devices: tubes/lines, ECG leads
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One patient's body: fixed across that patient's studies."""
    aspect: float          # height / width of the image
    body_half_width: float
    lung_x: float          # distance of each lung's centre from the midline
    lung_a: float          # lung half-width
    lung_top: float
    diaphragm: float       # dome level (right side is drawn slightly higher)
    ctr: float             # cardiothoracic ratio of the healthy heart
    mediastinum: float     # upper mediastinum width
    rib_spacing: float
    rib_curve: float
    exposure: float
    texture_seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Anatomy":
        return cls(aspect=rng.uniform(1.0, 1.25), body_half_width=rng.uniform(0.80, 0.93),
                   lung_x=rng.uniform(0.40, 0.46), lung_a=rng.uniform(0.25, 0.31),
                   lung_top=rng.uniform(0.10, 0.16), diaphragm=rng.uniform(0.72, 0.82),
                   ctr=rng.uniform(0.40, 0.48), mediastinum=rng.uniform(0.15, 0.20),
                   rib_spacing=rng.uniform(0.075, 0.09), rib_curve=rng.uniform(0.25, 0.45),
                   exposure=rng.uniform(0.85, 1.15), texture_seed=int(rng.integers(2**31)))


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


def render_frontal(anatomy: Anatomy, findings: dict[str, float], rng: np.random.Generator, width: int) -> np.ndarray:
    """uint8 [H, W] frontal radiograph; `findings` maps CheXpert observation -> strength (0..1)."""
    a = anatomy
    height = int(round(width * a.aspect))
    # Positioning varies from study to study of the same patient.
    shift_x, shift_y, scale = rng.uniform(-0.03, 0.03), rng.uniform(-0.02, 0.02), rng.uniform(0.97, 1.03)
    X = ((np.linspace(-1, 1, width, dtype=np.float32) - shift_x) / scale)[None, :]
    Y = ((np.linspace(0, 1, height, dtype=np.float32) * a.aspect - (a.aspect - 1) / 2 - shift_y) / scale)[:, None]
    f = findings.get
    px = 2.0 / width   # one pixel in grid units (x)

    # Body, shoulders sloping in at the top.
    shoulder = np.clip(Y / 0.18, 0.3, 1.0)
    body = _ramp(a.body_half_width * (0.75 + 0.25 * shoulder) - np.abs(X), 0.05) * _ramp(Y - 0.02, 0.04)
    density = 0.42 * body

    # Lungs: an ellipse cut below by a diaphragm dome; the cut makes the costophrenic angle.
    texture_rng = np.random.default_rng(a.texture_seed)   # the patient's own vessel pattern
    vessels = gaussian_filter(texture_rng.standard_normal((height, width)).astype(np.float32), 2.0 * width / 320)
    vessels /= vessels.std() + 1e-6
    markings = np.zeros((height, width), np.float32)
    lungs = np.zeros((height, width), np.float32)
    lung_info = {}
    mediastinum = a.mediastinum * (1.0 + 0.9 * f("Enlarged Cardiomediastinum", 0.0))
    for side in (-1, 1):   # -1: patient's right (image left)
        cx = side * a.lung_x
        dome_level = a.diaphragm - (0.03 if side < 0 else 0.0)
        cy, b = (a.lung_top + dome_level) / 2, (dome_level - a.lung_top) / 2 * 1.15
        e = ((X - cx) / a.lung_a) ** 2 + ((Y - cy) / b) ** 2
        dome = dome_level - 0.07 * np.exp(-((X - cx) / (0.8 * a.lung_a)) ** 2)
        lung = _ramp(1 - e, 0.08) * _ramp(dome - Y, 0.015)
        lung *= _ramp(np.abs(X) - mediastinum / 2 * (Y < 0.45), 0.03)   # upper mediastinum
        hilum = np.exp(-(((X - side * 0.2) / 0.25) ** 2 + ((Y - 0.45) / 0.25) ** 2))
        lung_info[side] = (cx, cy, b, e, dome_level)
        lungs += lung
        markings += lung * (0.35 + 0.65 * hilum)
    density -= 0.30 * lungs

    # Pneumothorax: a lateral-apical rim of the lung with no vessels, darker, edged by a pleural line.
    ptx = f("Pneumothorax", 0.0)
    if ptx > 0:
        side = rng.choice((-1, 1))
        cx, cy, b, e, _ = lung_info[side]
        rim_start = rng.uniform(0.45, 0.65)
        outer = _ramp(e - rim_start, 0.02) * _ramp(1 - e, 0.05) * (side * (X - cx) > -0.3 * a.lung_a) * (Y < cy + 0.15)
        markings *= 1 - ptx * outer
        density -= 0.10 * ptx * outer
        density += 0.12 * ptx * np.exp(-((e - rim_start) / 0.015) ** 2) * (side * (X - cx) > -0.3 * a.lung_a) * (Y < cy + 0.15)
    density += 0.035 * markings * vessels

    # Ribs: curved posterior ribs (bright bands) over the thorax; a fracture is a stepped gap.
    rib_phase = (Y - a.rib_curve * (np.abs(X) - 0.15) ** 2) / a.rib_spacing
    if f("Fracture", 0.0) > 0:
        x0, y0 = rng.choice((-1, 1)) * rng.uniform(0.45, 0.7), rng.uniform(0.3, 0.6)
        window = (np.abs(Y - y0) < 0.08) & (np.abs(X - x0) < 0.15)
        rib_phase = rib_phase + 0.45 * f("Fracture") * (window & (X > x0))
        gap = np.exp(-((X - x0) / 0.012) ** 2) * window
    else:
        gap = 0.0
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * rib_phase)) ** 6
    ribs = ribs * (1 - 0.8 * gap) * _ramp(a.body_half_width - 0.05 - np.abs(X), 0.05) * (Y > 0.06) * _ramp(a.diaphragm + 0.02 - Y, 0.04)
    density += 0.10 * ribs
    density += 0.12 * _ramp(0.05 - np.abs(X), 0.02) * body      # spine

    # Heart: half-width = CTR x half the thoracic width.
    ctr = a.ctr + (rng.uniform(0.16, 0.22) if f("Cardiomegaly", 0.0) else 0.0) * f("Cardiomegaly", 0.0)
    half_w = ctr * (a.lung_x + a.lung_a)
    heart = _ramp(1 - (((X - 0.3 * half_w) / half_w) ** 2 + ((Y - (a.diaphragm - 0.1)) / 0.17) ** 2), 0.15)
    density += 0.33 * heart

    # Diaphragm/abdomen below the domes.
    density += 0.20 * _ramp(Y - a.diaphragm - 0.01, 0.03) * body

    # Pleural effusion: fluid filling the base, meniscus climbing laterally.
    eff = f("Pleural Effusion", 0.0)
    if eff > 0:
        sides = (-1, 1) if rng.random() < 0.4 else (rng.choice((-1, 1)),)
        for side in sides:
            cx, cy, b, e, dome_level = lung_info[side]
            level = dome_level - rng.uniform(0.07, 0.2) * (0.5 + 0.5 * eff)
            lateral = np.clip(side * (X - cx) / a.lung_a, -1, 1.2)
            meniscus = level - 0.08 * np.clip(lateral, 0, None) ** 2
            fluid = _ramp(Y - meniscus, 0.03) * _ramp(1.0 - e, 0.08) * (Y < dome_level + 0.05)
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

    density += patches(int(rng.integers(1, 3)), 0.30, 0.12, (0.35, 0.7), "Consolidation")
    density += patches(int(rng.integers(2, 5)), 0.16, 0.10, (0.25, 0.7), "Lung Opacity")
    density += patches(int(rng.integers(1, 3)), 0.25, 0.11, (0.55, 0.72), "Pneumonia")
    if f("Atelectasis", 0.0) > 0:
        side = rng.choice((-1, 1))
        x0, y0, tilt = side * a.lung_x, a.diaphragm - rng.uniform(0.08, 0.15), rng.uniform(-0.25, 0.25)
        plate = np.exp(-((Y - y0 - tilt * (X - x0)) / 0.018) ** 2) * (np.abs(X - x0) < a.lung_a * 0.8)
        density += 0.25 * f("Atelectasis") * plate * lungs
    if f("Edema", 0.0) > 0:
        haze = np.exp(-(((np.abs(X) - 0.25) / 0.2) ** 2 + ((Y - 0.5) / 0.22) ** 2))
        kerley = (np.cos(2 * np.pi * Y / 0.02) > 0.85) * (np.abs(X) > a.lung_x + 0.4 * a.lung_a) * (Y > a.diaphragm - 0.2)
        density += f("Edema") * (0.22 * haze + 0.08 * kerley) * lungs
    if f("Lung Lesion", 0.0) > 0:
        side = rng.choice((-1, 1))
        x0, y0, r = side * a.lung_x + rng.uniform(-0.4, 0.4) * a.lung_a, rng.uniform(0.25, 0.6), rng.uniform(0.03, 0.06)
        density += 0.30 * f("Lung Lesion") * _ramp(1 - np.hypot(X - x0, Y - y0) / r, 0.2)
    if f("Pleural Other", 0.0) > 0:
        side = rng.choice((-1, 1))
        cx, cy, b, e, _ = lung_info[side]
        band = _ramp(e - 0.8, 0.05) * _ramp(1.05 - e, 0.05) * (side * (X - cx) > 0)
        density += 0.18 * f("Pleural Other") * band

    # Support devices: radiopaque tubes and lines, ECG electrodes.
    if f("Support Devices", 0.0) > 0:
        s = f("Support Devices")
        devices = np.zeros((height, width), np.float32)
        kinds = rng.permutation(4)[: int(rng.integers(1, 4))]
        for kind in kinds:
            if kind == 0:    # endotracheal tube down the midline
                path = np.array([[rng.uniform(-0.03, 0.03), -0.05], [rng.uniform(-0.02, 0.02), rng.uniform(0.22, 0.32)]])
                width_line = 0.012
            elif kind == 1:  # central venous line from a shoulder into the superior vena cava
                start = (rng.choice((-1, 1)) * rng.uniform(0.45, 0.6), 0.08)
                path = _bezier(start, (start[0] * 0.3, 0.15), (-0.06, rng.uniform(0.38, 0.48)))
                width_line = 0.006
            elif kind == 2:  # nasogastric tube down to below the diaphragm
                path = _bezier((0.0, -0.05), (-0.04, 0.5), (0.2, a.diaphragm + 0.12))
                width_line = 0.008
            else:            # ECG electrodes: small bright discs
                for _ in range(int(rng.integers(2, 5))):
                    x0, y0 = rng.uniform(-0.7, 0.7), rng.uniform(0.1, 0.8)
                    devices += _ramp(1 - np.hypot(X - x0, Y - y0) / 0.025, 0.3)
                continue
            cols = ((path[:, 0] * scale + shift_x) + 1) / 2 * (width - 1)
            rows = (path[:, 1] * scale + shift_y + (a.aspect - 1) / 2) / a.aspect * (height - 1)
            devices += _draw_path((height, width), rows, cols, 2 * width_line / px)
        density += 0.55 * s * np.clip(devices, 0, 1)

    return _expose(density, a.exposure, rng)


def render_lateral(anatomy: Anatomy, findings: dict[str, float], rng: np.random.Generator, width: int) -> np.ndarray:
    """A simpler lateral view: one lung field, the spine behind, the heart in front."""
    a = anatomy
    height = int(round(width * a.aspect))
    X = np.linspace(-1, 1, width, dtype=np.float32)[None, :] + rng.uniform(-0.03, 0.03)
    Y = (np.linspace(0, 1, height, dtype=np.float32) * a.aspect - (a.aspect - 1) / 2)[:, None]
    body = _ramp(0.85 - np.abs(X), 0.05) * _ramp(Y - 0.02, 0.04)
    lung = _ramp(1 - ((X / 0.6) ** 2 + ((Y - 0.45) / 0.4) ** 2), 0.08) * _ramp(a.diaphragm - Y, 0.02)
    heart = _blob(X, Y, -0.35, a.diaphragm - 0.15, 0.3 + 0.15 * findings.get("Cardiomegaly", 0.0), 0.2)
    spine = _ramp(0.08 - np.abs(X - 0.62), 0.03) * (np.cos(2 * np.pi * Y / 0.06) * 0.3 + 0.7)
    density = 0.42 * body - 0.28 * lung + 0.28 * heart * lung + 0.3 * spine
    if findings.get("Pleural Effusion", 0.0) > 0:
        density += 0.3 * findings["Pleural Effusion"] * _ramp(Y - (a.diaphragm - 0.1 - 0.1 * X), 0.03) * lung
    return _expose(density, a.exposure, rng)


def _expose(density: np.ndarray, exposure: float, rng: np.random.Generator) -> np.ndarray:
    """Density -> 8-bit radiograph with study-specific exposure and quantum noise."""
    gain = exposure * rng.uniform(0.95, 1.05)
    # Film-like response: saturating in dense tissue instead of clipping it to white.
    image = (0.06 + 0.94 * (1 - np.exp(-2.2 * gain * np.clip(density, 0, None)))) ** rng.uniform(0.9, 1.1)
    image += rng.normal(0.0, 0.012, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
