"""Procedural H&E-like pathology tiles whose features are known by construction, with graded
multiple-choice questions, reference answers and evaluation criteria derived from that truth.

Each tile has five attributes: nuclear size (small/large), cellularity (low/high density of
cells), staining (pale/dark), pleomorphism (mild/marked: variable size and irregular shape) and
mitoses (absent/present). Its question is drawn by difficulty:

* easy (2 options): size, staining, or cellularity alone;
* medium (4 options): size x cellularity, or size x staining;
* hard: mitoses present? pleomorphism? (2 options, small or subtle cues) or a 3-option toy
  grade that scores one point each for large nuclei, marked pleomorphism and mitoses (loosely
  after the Nottingham idea of summing nuclear and mitotic scores; not a clinical grade).

Option order is fixed per question family so a tiny model can learn letter = visual class, and
the correct option is uniform over the options of every family by construction (attributes are
drawn uniformly; for the grade, the grade is drawn first and the attributes to match it), so a
constant letter scores chance and no better.

Every cell has a cytoplasm of fixed size around its nucleus, so cellularity shows as how much of
the tile is cells rather than pink stroma, whatever the nuclear size: with nuclei alone, few large
nuclei cover as many pixels as many small ones, and cellularity could only be read by counting.

Criteria are *checkable claims* ``"<subject> is <value>, not <alternative>"`` (one per attribute
the question depends on), which a judge can hold against the reasoning: asserting the
alternative is an error (:mod:`rewards.judge.rubric`). ``caption`` describes a tile in the same
phrases, without options or answer format, for pretraining a base model to see.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


GENERATOR_VERSION = "p3"


@dataclass(frozen=True)
class PathologyConfig:
    """Rendering and question-mix settings (pixels for a ``image_size`` square tile)."""

    image_size: int = 112  # multiple of 28 (Qwen2.5-VL patch 14 x merge 2)
    small_radius: tuple[float, float] = (2.0, 2.8)
    large_radius: tuple[float, float] = (5.2, 6.6)
    low_count: tuple[int, int] = (6, 10)
    high_count: tuple[int, int] = (36, 48)
    cell_radius: float = 6.5  # cytoplasm around each nucleus, the same for small and large nuclei
    pale_rgb: tuple[int, int, int] = (170, 140, 210)
    dark_rgb: tuple[int, int, int] = (50, 20, 95)
    cytoplasm_rgb: tuple[int, int, int] = (196, 128, 190)
    mitosis_rgb: tuple[int, int, int] = (25, 8, 40)
    stroma_rgb: tuple[int, int, int] = (238, 176, 206)
    difficulty_mix: tuple[tuple[str, float], ...] = (("easy", 0.4), ("medium", 0.35),
                                                      ("hard", 0.25))


FAMILIES = {"easy": ("size", "stain", "density"), "medium": ("size_density", "size_stain"),
            "hard": ("mitosis", "pleomorphism", "grade")}
WORDS = {  # attribute value -> option phrase
    "size": {"small": "small nuclei", "large": "large nuclei"},
    "density": {"low": "low cellularity", "high": "high cellularity"},
    "stain": {"pale": "pale (vesicular) nuclei", "dark": "dark (hyperchromatic) nuclei"},
    "pleomorphism": {"mild": "mild pleomorphism (uniform nuclei)",
                     "marked": "marked pleomorphism (variable size and shape)"},
    "mitosis": {"absent": "no mitotic figures", "present": "mitotic figures present"},
}
VALUES = {name: tuple(words) for name, words in WORDS.items()}
GRADES = ("low grade", "intermediate grade", "high grade")
QUESTIONS = {
    "size": "What is the predominant nuclear size in this H&E tile?",
    "stain": "How intensely are the nuclei stained in this H&E tile?",
    "density": "What is the cellularity (density of nuclei) of this H&E tile?",
    "size_density": "Which description fits the nuclei in this H&E tile?",
    "size_stain": "Which description fits the nuclei in this H&E tile?",
    "mitosis": "Are mitotic figures (very dark, clumped, spiky nuclei) present in this H&E tile?",
    "pleomorphism": "What is the degree of nuclear pleomorphism in this H&E tile?",
    "grade": ("Score one point each for large nuclei, marked pleomorphism and mitotic figures; "
              "0-1 points is low grade, 2 intermediate grade, 3 high grade. What is the grade "
              "of this H&E tile?"),
}


GRADED = ("size", "pleomorphism", "mitosis")  # one grade point each for large / marked / present
CLAIMS = {  # attribute -> (subject of the claim, value -> phrase); "mitotic figures" takes "are"
    "size": ("nuclear size", {"small": "small", "large": "large"}),
    "density": ("cellularity", {"low": "low", "high": "high"}),
    "stain": ("nuclear staining", {"pale": "pale (vesicular)", "dark": "dark (hyperchromatic)"}),
    "pleomorphism": ("pleomorphism", {"mild": "mild", "marked": "marked"}),
    "mitosis": ("mitotic figures", {"absent": "absent", "present": "present"}),
}


def sample_truth(rng: np.random.Generator, config: PathologyConfig, family: str | None = None) -> dict:
    """Draw the tile's attributes and its concrete numbers. Attributes are uniform and
    independent, except for a ``"grade"`` question, whose grade is drawn uniformly first and
    the graded attributes then drawn uniformly among those that give it."""
    truth = {name: str(rng.choice(values)) for name, values in VALUES.items()}
    if family == "grade":
        grade = int(rng.integers(0, len(GRADES)))               # 0 low (0-1 points), 1 two, 2 three
        points = int(rng.integers(0, 2)) if grade == 0 else grade + 1
        raised = set(rng.permutation(len(GRADED))[:points].tolist())
        for i, name in enumerate(GRADED):
            truth[name] = VALUES[name][1 if i in raised else 0]
    low, high = config.low_count if truth["density"] == "low" else config.high_count
    truth["n_nuclei"] = int(rng.integers(low, high + 1))
    truth["n_mitoses"] = int(rng.integers(1, 4)) if truth["mitosis"] == "present" else 0
    truth["grade_points"] = ((truth["size"] == "large") + (truth["pleomorphism"] == "marked")
                             + (truth["mitosis"] == "present"))
    return truth


# --- rendering -------------------------------------------------------------------------------

def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random cells x cells grid upsampled bilinearly."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), "L")
    return np.asarray(grid.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255


def _background(rng, config: PathologyConfig) -> np.ndarray:
    size = config.image_size
    base = np.array(config.stroma_rgb, np.float32)
    shade = 0.86 + 0.14 * _smooth_noise(rng, size, 6)[..., None]    # uneven eosin
    fibres = 0.94 + 0.06 * _smooth_noise(rng, size, 28)[..., None]  # fine stromal texture
    image = base * shade * fibres + 4 * rng.standard_normal((size, size, 3), np.float32)
    return image.astype(np.float32)


def _blob(image, cy, cx, radius, ratio, angle, wobble, rgb, rng) -> float:
    """Alpha-blend one nucleus (an ellipse with a wavy outline) into ``image``; returns its
    area in pixels. Vectorised over a local bounding box."""
    size = image.shape[0]
    reach = int(np.ceil(radius * (1 + wobble) + 2))
    y0, y1 = max(0, int(cy) - reach), min(size, int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(size, int(cx) + reach + 1)
    if y0 >= y1 or x0 >= x1:
        return 0.0
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = dx * cos + dy * sin, (-dx * sin + dy * cos) / ratio
    edge = radius
    if wobble > 0:  # the angle is only needed for wavy outlines
        theta = np.arctan2(v, u)
        edge = radius * (1 + wobble * np.sin(3 * theta + rng.uniform(0, 6.3))
                         * np.cos(2 * theta + rng.uniform(0, 6.3)))
    alpha = np.clip(edge - np.hypot(u, v) + 0.5, 0, 1)[..., None]  # 1-px soft edge
    texture = 1 + 0.08 * rng.standard_normal(alpha.shape[:2], np.float32)[..., None]   # chromatin grain
    patch = image[y0:y1, x0:x1]
    patch[:] = patch * (1 - alpha) + np.asarray(rgb, np.float32) * texture * alpha
    return float(alpha.sum())


def _mitosis(image, cy, cx, rgb, rng) -> None:
    """A metaphase-like figure: a dense dark bar with short spikes (chromosomes) on both sides."""
    angle = rng.uniform(0, np.pi)
    _blob(image, cy, cx, 4.0, 0.35, angle, 0.05, rgb, rng)
    for _ in range(6):
        t = rng.uniform(-3.5, 3.5)
        side = rng.choice([-1, 1]) * rng.uniform(1.5, 2.5)
        y = cy + t * np.sin(angle) + side * np.cos(angle)
        x = cx + t * np.cos(angle) - side * np.sin(angle)
        _blob(image, y, x, 0.9, 1.0, 0.0, 0.0, rgb, rng)


def render_tile(truth: dict, rng: np.random.Generator, config: PathologyConfig) -> Image.Image:
    """Draw the tile for ``truth``; records the measured mean nuclear radius in ``truth``."""
    image = _background(rng, config)
    size = config.image_size
    r_low, r_high = config.small_radius if truth["size"] == "small" else config.large_radius
    marked = truth["pleomorphism"] == "marked"
    rgb = np.array(config.dark_rgb if truth["stain"] == "dark" else config.pale_rgb, np.float32)
    centres = rng.uniform(2, size - 2, (truth["n_nuclei"], 2))
    for cy, cx in centres:  # cytoplasm first, nuclei on top
        _blob(image, cy, cx, config.cell_radius * rng.uniform(0.9, 1.1), rng.uniform(0.8, 1.0),
              rng.uniform(0, np.pi), 0.0, config.cytoplasm_rgb, rng)
    radii = []
    for cy, cx in centres:
        radius = rng.uniform(r_low, r_high)
        if marked:  # variable size, elongated, wavy outline
            radius *= float(np.clip(rng.lognormal(0, 0.3), 0.6, 1.6))
        ratio = rng.uniform(0.45, 0.9) if marked else rng.uniform(0.8, 1.0)
        wobble = rng.uniform(0.12, 0.25) if marked else 0.0
        shade = rgb * rng.uniform(0.92, 1.08)
        _blob(image, cy, cx, radius, ratio, rng.uniform(0, np.pi), wobble, shade, rng)
        radii.append(radius * np.sqrt(ratio))  # radius of the circle of equal area
    for _ in range(truth["n_mitoses"]):
        _mitosis(image, rng.uniform(8, size - 8), rng.uniform(8, size - 8),
                 config.mitosis_rgb, rng)
    truth["mean_radius_px"] = round(float(np.mean(radii)), 2)
    truth["radius_cv"] = round(float(np.std(radii) / np.mean(radii)), 3)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


# --- questions -------------------------------------------------------------------------------

def claim(attribute: str, value: str) -> str:
    """The checkable criterion ``"<subject> is <value>, not <other value>"``."""
    subject, phrases = CLAIMS[attribute]
    verb = "are" if subject.endswith("figures") else "is"
    others = " or ".join(p for v, p in phrases.items() if v != value)
    return f"{subject} {verb} {phrases[value]}, not {others}"


def caption(truth: dict) -> str:
    """What the tile shows, every attribute in the criteria's phrases (no options, no format)."""
    return ". ".join(claim(a, truth[a]).split(", not ")[0] for a in CLAIMS) + "."


def _options_and_answer(family: str, truth: dict) -> tuple[list[str], str, tuple[str, ...]]:
    """Options (fixed order), the correct one, and the attributes the question is about."""
    if family in WORDS:
        return list(WORDS[family].values()), WORDS[family][truth[family]], (family,)
    if family == "grade":
        grade = GRADES[max(truth["grade_points"] - 1, 0)]
        return list(GRADES), grade, GRADED
    first, second = family.split("_")
    options = [f"{WORDS[first][a]}, {WORDS[second][b]}"
               for a in VALUES[first] for b in VALUES[second]]
    return options, f"{WORDS[first][truth[first]]}, {WORDS[second][truth[second]]}", (first,
                                                                                       second)


def _criteria(family: str, truth: dict, answer: str, attrs) -> list[str]:
    """One checkable claim per attribute the answer depends on (and the grade it gives)."""
    facts = [claim(a, truth[a]) for a in attrs]
    if family == "grade":
        level = answer.split()[0]
        others = " or ".join(g.split()[0] for g in GRADES if g != answer)
        facts.append(f"the grade is {level}, not {others}")
    return facts


def make_question(family: str, truth: dict) -> dict:
    options, answer, attrs = _options_and_answer(family, truth)
    return {"question": QUESTIONS[family], "options": options, "answer": answer,
            "criteria": _criteria(family, truth, answer, attrs)}


def pick_family(rng: np.random.Generator, config: PathologyConfig) -> tuple[str, str]:
    names = [name for name, _ in config.difficulty_mix]
    weights = np.array([w for _, w in config.difficulty_mix], float)
    difficulty = str(rng.choice(names, p=weights / weights.sum()))
    return difficulty, str(rng.choice(FAMILIES[difficulty]))


def generate_item(seed: int, index: int, config: PathologyConfig = PathologyConfig()):
    """Tile ``index`` of the stream for ``seed``: (PIL image, question dict, truth, difficulty).

    Each item has its own generator seeded by (seed, index), so the first n items are the same
    whatever total is generated, and any item can be regenerated on its own.
    """
    rng = np.random.default_rng([seed, index, 1])
    difficulty, family = pick_family(rng, config)
    truth = sample_truth(rng, config, family)
    image = render_tile(truth, rng, config)
    question = make_question(family, truth)
    return image, question, truth, {"difficulty": difficulty, "task": family}


def generate_caption_item(seed: int, index: int, config: PathologyConfig = PathologyConfig()):
    """Tile ``index`` of the *pretraining* stream for ``seed``: (PIL image, caption, truth). Its
    generator is seeded by (seed, index, 3), a stream disjoint from ``generate_item``'s, so no
    pretraining tile is an SFT, RL or test tile."""
    rng = np.random.default_rng([seed, index, 3])
    truth = sample_truth(rng, config)
    image = render_tile(truth, rng, config)
    return image, caption(truth), truth
