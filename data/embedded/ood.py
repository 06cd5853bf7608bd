"""Procedural out-of-domain images for PathVLM-R1's four OOD modalities: CT, dermoscopy, fundus
and OCT (the paper draws them from OmniMedVQA). Each image has one binary finding that is known
by construction, so questions, answers and criteria are exact. They are cartoons of the
modality, labelled ``extra["synthetic"] = True``; real images, where a package ships one, come
from :mod:`data.embedded.assets`.

Every item asks for the modality's finding, so every answer needs the image: the finding is
present in exactly every other item (odd indices) and the options keep their order, so the
correct letters alternate A/B and a constant letter scores 50 %. (A "which modality is this?"
question is not asked: within one modality's set its answer is constant, so it would measure the
letter prior, not reading.) The criterion is a checkable claim, as for the tiles.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OOD_MODALITIES = ("ct", "dermoscopy", "fundus", "oct")
FINDINGS = {  # modality -> (question, [absent option, present option], what each looks like)
    "ct": ("Is there a nodule in the lungs on this chest CT slice?",
           ["no lung nodule", "lung nodule present"],
           ("both lung fields are uniformly dark with no round opacity",
            "a round bright opacity (nodule) lies inside a dark lung field")),
    "dermoscopy": ("Which description fits this dermoscopic lesion?",
                   ["symmetric lesion with regular border and one colour",
                    "asymmetric lesion with irregular border and several colours"],
                   ("the lesion is round and symmetric with a regular border and one brown colour",
                    "the lesion is asymmetric with an irregular border and several colours")),
    "fundus": ("Are microaneurysms (small red dots) present in this fundus photograph?",
               ["no microaneurysms", "microaneurysms present"],
               ("the retina shows vessels and the optic disc but no small red dots",
                "small dark red dots (microaneurysms) are scattered on the retina")),
    "oct": ("Is intraretinal fluid (a dark cystic space) present on this OCT B-scan?",
            ["no intraretinal fluid", "intraretinal fluid present"],
            ("the retinal layers are continuous with no dark cystic space",
             "dark oval cystic spaces (fluid) interrupt the retinal layers")),
}
CLAIMS = {  # modality -> (subject, value if absent, value if present)
    "ct": ("a lung nodule", "absent", "present"),
    "dermoscopy": ("the lesion", "symmetric", "asymmetric"),
    "fundus": ("microaneurysms", "absent", "present"),
    "oct": ("intraretinal fluid", "absent", "present"),
}


def finding_claim(modality: str, present: bool) -> str:
    """The checkable criterion, e.g. ``"a lung nodule is present, not absent"``."""
    subject, absent, shown = CLAIMS[modality]
    verb = "are" if subject.endswith("s") else "is"
    value, other = (shown, absent) if present else (absent, shown)
    return f"{subject} {verb} {value}, not {other}"


def _noise(rng, size, sigma):
    return rng.normal(0, sigma, (size, size, 3))


def _ct(rng, present: bool, size: int) -> Image.Image:
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    s = size / 112
    draw.ellipse([8 * s, 18 * s, 104 * s, 94 * s], fill=115)       # body (soft tissue)
    lungs = [[18 * s, 28 * s, 52 * s, 80 * s], [60 * s, 28 * s, 94 * s, 80 * s]]
    for box in lungs:
        draw.ellipse(box, fill=20)                                  # air in the lungs
    draw.ellipse([49 * s, 74 * s, 63 * s, 88 * s], fill=235)       # vertebral body
    if present:
        x0, y0, x1, y1 = lungs[int(rng.integers(0, 2))]
        cx, cy = rng.uniform(x0 + 8 * s, x1 - 8 * s), rng.uniform(y0 + 12 * s, y1 - 12 * s)
        r = rng.uniform(3, 5) * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=150)
    pixels = np.asarray(image, np.float32)[..., None].repeat(3, 2) + _noise(rng, size, 6)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _dermoscopy(rng, present: bool, size: int) -> Image.Image:
    skin = np.array([226, 184, 156], np.float32) * rng.uniform(0.9, 1.05)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in skin))
    draw = ImageDraw.Draw(image)
    c, radius = size / 2, size * rng.uniform(0.22, 0.3)
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    if present:  # asymmetric, irregular, multicoloured
        radii = radius * (1 + 0.25 * np.sin(2 * angles + rng.uniform(0, 6))
                          + rng.uniform(-0.18, 0.18, angles.size))
    else:
        radii = radius * (1 + rng.uniform(-0.03, 0.03, angles.size))
    outline = [(c + r * np.cos(a), c + r * np.sin(a)) for r, a in zip(radii, angles)]
    draw.polygon(outline, fill=(150, 96, 62))
    if present:
        for colour in ((70, 40, 30), (110, 120, 150)):  # dark brown and blue-grey areas
            x, y, r = c + rng.uniform(-8, 8), c + rng.uniform(-8, 8), radius * 0.35
            draw.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    pixels = np.asarray(image, np.float32) + _noise(rng, size, 4)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _fundus(rng, present: bool, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d = np.hypot(yy - size / 2, xx - size / 2) / (size * 0.46)
    base = np.array([200, 90, 40], np.float32) * (1 - 0.35 * d[..., None] ** 2)
    image = Image.fromarray(np.clip(base * (d[..., None] <= 1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    disc_x, disc_y = size * rng.choice([0.3, 0.7]), size * rng.uniform(0.42, 0.58)
    for _ in range(4):  # vessels leave the optic disc
        angle = rng.uniform(0, 2 * np.pi)
        end = (disc_x + np.cos(angle) * size * 0.4, disc_y + np.sin(angle) * size * 0.4)
        draw.line([(disc_x, disc_y), end], fill=(130, 30, 20), width=2)
    r = size * 0.07
    draw.ellipse([disc_x - r, disc_y - r, disc_x + r, disc_y + r], fill=(250, 220, 150))
    if present:
        for _ in range(int(rng.integers(5, 11))):
            a, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.38) * size
            x, y = size / 2 + rad * np.cos(a), size / 2 + rad * np.sin(a)
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(110, 10, 10))
    pixels = np.asarray(image, np.float32) + _noise(rng, size, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _oct(rng, present: bool, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    top = size * 0.35 + size * 0.08 * np.exp(-((xx - size / 2) / (size * 0.12)) ** 2)  # fovea
    depth = yy - top
    bands = np.zeros((size, size), np.float32)
    for start, stop, level in ((0, 4, 200), (4, 14, 90), (14, 20, 150), (20, 28, 70),
                               (28, 32, 240), (32, 40, 120)):
        bands[(depth >= start) & (depth < stop)] = level
    if present:
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(size * 0.25, size * 0.75), rng.uniform(8, 20)
            rx, ry = rng.uniform(4, 8), rng.uniform(2.5, 4.5)
            inside = ((xx - cx) / rx) ** 2 + ((depth - cy) / ry) ** 2 <= 1
            bands[inside] = 15
    pixels = bands[..., None].repeat(3, 2) + _noise(rng, size, 12)  # speckle
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


RENDERERS = {"ct": _ct, "dermoscopy": _dermoscopy, "fundus": _fundus, "oct": _oct}


def generate_ood_item(modality: str, seed: int, index: int, size: int = 112):
    """(image, question dict, truth) for item ``index`` of ``modality``, seeded by
    (seed, modality, index)."""
    if modality not in RENDERERS:
        raise ValueError(f"unknown OOD modality {modality!r}; choose from {OOD_MODALITIES}")
    rng = np.random.default_rng([seed, OOD_MODALITIES.index(modality), index, 2])
    present = index % 2 == 1
    image = RENDERERS[modality](rng, present, size)
    question, options, looks = FINDINGS[modality]
    item = {"question": question, "options": list(options), "answer": options[int(present)],
            "criteria": [finding_claim(modality, present)]}
    return image, item, {"finding_present": present, "task": "finding", "appearance": looks[int(present)]}
