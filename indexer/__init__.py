"""The image search engine: KAZE features, global vectors in Annoy, geometric verification."""

import os as _os

# A query multiplies small matrices (a thousand descriptors by 64 centroids); a
# multi-threaded BLAS spends more time waking and spinning its threads than
# computing, and on a busy 2-core machine that turned 2 ms of encoding into
# 100-300 ms. Parallelism comes from our worker processes instead. This only
# takes effect when the engine is imported before numpy, as the entry points do.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_variable, "1")
