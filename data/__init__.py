"""VQA data for GRPO training of vision-language models (PathVLM-R1 reproduction).

* :class:`VQARecord`, :class:`VQADataset` - the record type and a list of records with a report;
* :func:`load_dataset` - this project's JSONL and the public layouts (PathVQA, PMC-VQA,
  OmniMedVQA, PathMMU, SLAKE, VQA-RAD, the R1 ``image/problem/solution`` files) from JSON, JSONL,
  CSV, pickles or Parquet, validated with clear errors; ``python -m data.check FILE`` prints the
  load report;
* :func:`as_records`, :func:`from_hf_dataset` - Hugging Face ``datasets.Dataset`` objects
  through the same layouts (duck typed: ``datasets`` is never imported here);
* :func:`load_embedded`, :func:`embedded_splits` - the offline default dataset
  (:mod:`data.embedded`: procedural tiles, OOD cartoons, package images, DICOM reader);
* :mod:`data.prompts` - R1 prompts, Qwen2.5-VL chat messages, SFT targets, image loading
  (:data:`SYSTEM_PROMPT`, :func:`build_messages`, :func:`build_sft_target` at package level);
* :mod:`data.splits` - seeded image-disjoint splits and content-hash manifests
  (:func:`split_records`, :func:`write_manifest` at package level);
* :mod:`data.readers` - the one image decoder (:func:`read_image`) and sha256 helpers, which
  ``rewards`` and ``grpo`` use too.

See docs/data.md.
"""
from . import prompts, splits
from .embedded import CAPTION_PROMPT, EMBEDDED_VERSION, caption_items, embedded_splits, load_embedded
from .convert import as_records, from_hf_dataset
from .loaders import detect_layout, load_dataset
from .prompts import SYSTEM_PROMPT, build_messages, build_sft_target
from .readers import read_image
from .records import DataError, LoadReport, VQADataset, VQARecord, normalize_modality
from .splits import split_records, write_manifest

__all__ = ["VQARecord", "VQADataset", "LoadReport", "DataError", "load_dataset",
           "as_records", "from_hf_dataset",
           "detect_layout", "load_embedded", "embedded_splits", "caption_items", "CAPTION_PROMPT", "EMBEDDED_VERSION", "normalize_modality", "prompts",
           "splits", "SYSTEM_PROMPT", "build_messages", "build_sft_target", "read_image",
           "split_records", "write_manifest"]
