"""VQA data for GRPO training of vision-language models (PathVLM-R1 reproduction).

* :class:`VQARecord`, :class:`VQADataset` - the record type and a list of records with a report;
* :func:`load_dataset` - this project's JSONL and the public layouts (PathVQA, PMC-VQA,
  OmniMedVQA, PathMMU, SLAKE, VQA-RAD), validated with clear errors;
* :func:`load_embedded`, :func:`embedded_splits` - the offline default dataset
  (:mod:`data.embedded`: procedural tiles, OOD cartoons, package images, DICOM reader);
* :mod:`data.prompts` - R1 prompts, Qwen2.5-VL chat messages, SFT targets, image loading;
* :mod:`data.splits` - seeded image-disjoint splits and content-hash manifests.

See docs/data.md.
"""
from . import prompts, splits
from .embedded import embedded_splits, load_embedded
from .loaders import detect_layout, load_dataset
from .records import DataError, LoadReport, VQADataset, VQARecord, normalize_modality

__all__ = ["VQARecord", "VQADataset", "LoadReport", "DataError", "load_dataset",
           "detect_layout", "load_embedded", "embedded_splits", "normalize_modality", "prompts",
           "splits"]
