"""The image search engine: KAZE features, global vectors in Annoy, an inverted file of
visual words, geometric verification.

This module is the engine's public API: the bot, the benchmarks and any other caller import
from ``indexer`` only, never from its modules. Everything else may change shape.
"""

import os as _os

# A query multiplies small matrices (a thousand descriptors by 64 centroids); a
# multi-threaded BLAS spends more time waking and spinning its threads than
# computing, and on a busy 2-core machine that turned 2 ms of encoding into
# 100-300 ms. Parallelism comes from our worker processes instead, which inherit
# this environment. It only takes effect before numpy is imported, which is why
# it comes before the imports below: every engine module is loaded through here.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_variable, "1")

from indexer.heap import keep_freed_memory  # noqa: E402

# Every process that runs the engine (the bot, the CLI, the worker processes, which
# import it too) keeps the memory a query frees for the next query (indexer/heap.py).
keep_freed_memory()

from indexer.backfill import ImportReport, import_export  # noqa: E402
from indexer.build import BuildReport, build_index  # noqa: E402
from indexer.catalog import GLOBAL_SCOPE, ChatRecords, ImageRecord  # noqa: E402
from indexer.contact_sheet import SheetEntry, render_contact_sheet  # noqa: E402
from indexer.errors import (  # noqa: E402
    CatalogError,
    CorruptImageError,
    EmptyImageError,
    ExportError,
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    IndexCorruptError,
    IndexerError,
    IndexIncompatibleError,
    IndexNotFoundError,
    IndexStateError,
    NoFeaturesError,
    NotFoundError,
    SourceError,
    StorageFullError,
    UnsupportedFormatError,
)
from indexer.images import Picture, decode_rgb, open_picture  # noqa: E402
from indexer.pictures import encode_jpeg  # noqa: E402
from indexer.search import AddResult, IndexStats, Match, SearchService, StageTimings  # noqa: E402
from indexer.settings import EngineSettings  # noqa: E402
from indexer.telegram_ids import message_link  # noqa: E402
from indexer.workers import CpuPool  # noqa: E402

__all__ = [
    "GLOBAL_SCOPE",
    "AddResult",
    "BuildReport",
    "CatalogError",
    "ChatRecords",
    "CorruptImageError",
    "CpuPool",
    "EmptyImageError",
    "EngineSettings",
    "ExportError",
    "ImageError",
    "ImageRecord",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "ImportReport",
    "IndexCorruptError",
    "IndexIncompatibleError",
    "IndexNotFoundError",
    "IndexStateError",
    "IndexStats",
    "IndexerError",
    "Match",
    "NoFeaturesError",
    "NotFoundError",
    "Picture",
    "SearchService",
    "SheetEntry",
    "SourceError",
    "StageTimings",
    "StorageFullError",
    "UnsupportedFormatError",
    "build_index",
    "decode_rgb",
    "encode_jpeg",
    "import_export",
    "message_link",
    "open_picture",
    "render_contact_sheet",
]
