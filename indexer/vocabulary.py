"""The visual vocabulary: local descriptors -> visual words with binary signatures.

A word is a *product* word (Jegou et al., product quantisation; Babenko &
Lempitsky's inverted multi-index): each 64-d KAZE descriptor is cut into two
32-d halves, each half is quantised by its own k-means codebook of ``k``
centroids, and the word is the pair, one of k*k (2^20 for k = 1024). Assigning
a descriptor costs two small matrix products instead of a search among a
million centroids, and training needs only two k-means of k centroids.

Each (descriptor, word) pair also gets a 32-bit signature, Hamming embedding
(Jegou, Douze & Schmid 2008) done per half: the half is projected on 16 random
orthogonal directions and each projection is compared with its median among
the training halves assigned to the same half-word. Two descriptors of one word
whose signatures differ in few bits are close in descriptor space too, so a
word match can be checked as a descriptor match without the descriptors.

Like the VLAD codebook, a vocabulary is trained on the collection and saved
beside the index; its ``id`` ties every posting list to the vocabulary that
made it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from indexer.encoding import train_centroids
from indexer.errors import IndexCorruptError
from indexer.npz import read_arrays, write_arrays

FloatArray = npt.NDArray[np.float32]
WordArray = npt.NDArray[np.uint32]
SignatureArray = npt.NDArray[np.uint32]

HALF = 32  # dimensions of each half of a KAZE descriptor
BITS_PER_HALF = 16  # the two halves' bits fill one uint32 signature
SIGNATURE_BITS = 2 * BITS_PER_HALF
# k-means on more halves than this buys little and costs memory (its one-hot
# matrix is samples x k floats).
MAX_TRAINING_HALVES = 65_536
# A half-word needs this many training halves for its own medians; rarer ones
# use the medians over every half.
MIN_HALVES_FOR_MEDIANS = 8
_PROJECTION_SEED = 20_080_000


@dataclass(frozen=True, slots=True)
class Assignment:
    """The words and signatures of a set of descriptors.

    Row ``i`` holds descriptor ``i``'s ``m`` nearest words (nearest first) and
    the signature of the descriptor in each of them.
    """

    words: WordArray  # (n, m)
    signatures: SignatureArray  # (n, m)


# Columns of word scores that never win (Vocabulary._word_scoring).
_NEVER_COLUMNS = 16


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """Two half-codebooks plus their Hamming-embedding parameters; immutable."""

    centroids: FloatArray  # (2, k, 32)
    projections: FloatArray  # (2, 32, 16) orthonormal columns
    medians: FloatArray  # (2, k, 16) per half-word thresholds
    trained_on: int  # images the vocabulary was trained on
    # Per half, the matrix that scores words (built once: rebuilding it cost a
    # quick vote a tenth of a millisecond).
    _scoring: tuple[FloatArray, FloatArray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_scoring", (self._word_scoring(0), self._word_scoring(1)))

    @property
    def half_words(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def size(self) -> int:
        """How many distinct words there are."""
        return self.half_words * self.half_words

    @property
    def id(self) -> str:
        """A content hash: posting lists made by different vocabularies never mix."""
        digest = hashlib.blake2b(self.centroids.tobytes(), digest_size=8)
        digest.update(self.projections.tobytes())
        digest.update(self.medians.tobytes())
        return digest.hexdigest()

    def assign(self, descriptors: FloatArray, *, per_half: int = 1) -> Assignment:
        """Words and signatures of ``descriptors`` (n, 64).

        With ``per_half`` > 1 each half is assigned to its ``per_half`` nearest
        half-words and the descriptor gets every combination, ``per_half**2``
        words, nearest pair first (multiple assignment: a query descriptor near
        a word border still meets its counterpart on the other side).
        """
        count = len(descriptors)
        per_half = min(per_half, self.half_words)
        ones = np.ones((count, 1), dtype=np.float32)
        nearest: list[npt.NDArray[np.intp]] = []
        bits: list[npt.NDArray[np.uint32]] = []
        for side, scoring in enumerate(self._scoring):
            half = np.hstack([descriptors[:, side * HALF : (side + 1) * HALF], ones])
            # argmin |x - c|^2 == argmax (x.c - |c|^2 / 2), the constant riding on
            # the column of ones: a separate subtraction would cost as much again.
            best = _best_columns(half @ scoring, per_half)
            nearest.append(best)
            projected = half[:, :HALF] @ self.projections[side]  # (n, 16)
            above = projected[:, None, :] > self.medians[side][best]  # (n, per_half, 16)
            weights = (1 << np.arange(BITS_PER_HALF, dtype=np.uint32)).astype(np.uint32)
            bits.append((above.astype(np.uint32) * weights).sum(axis=2, dtype=np.uint32))
        first, second = nearest
        words = first[:, :, None] * self.half_words + second[:, None, :]
        signatures = bits[0][:, :, None] | (bits[1][:, None, :] << np.uint32(BITS_PER_HALF))
        # Nearest pair first: the sum of both halves' ranks orders the combinations.
        order = np.argsort(
            (np.arange(per_half)[:, None] + np.arange(per_half)[None, :]).reshape(-1),
            kind="stable",
        )
        shape = (count, per_half * per_half)
        return Assignment(
            words=np.ascontiguousarray(words.reshape(shape)[:, order], dtype=np.uint32),
            signatures=np.ascontiguousarray(signatures.reshape(shape)[:, order], dtype=np.uint32),
        )

    def _word_scoring(self, side: int) -> FloatArray:
        """(33, k + 16): the half-centroids with -|c|^2 / 2 below them, then columns
        that never win."""
        centroids = self.centroids[side]
        words = np.vstack([centroids.T, -0.5 * np.einsum("ij,ij->i", centroids, centroids)])
        # Columns that never win, so that the scores' rows are not a power of two
        # apart: at 1,024 words such rows share cache sets, and the assignment took
        # a quarter longer (docs/BENCHMARKS.md, "Memory a query frees").
        never = np.zeros((HALF + 1, _NEVER_COLUMNS), np.float32)
        never[HALF] = np.finfo(np.float32).min
        return np.ascontiguousarray(np.hstack([words, never]), dtype=np.float32)

    def save(self, path: Path) -> None:
        """Write to ``path`` (npz). The caller makes the write atomic."""
        write_arrays(
            path,
            {
                "centroids": self.centroids,
                "projections": self.projections,
                "medians": self.medians,
                "trained_on": np.array([self.trained_on], dtype=np.int64),
            },
        )

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`.

        Raises:
            IndexCorruptError: the file is missing, truncated or malformed.
        """
        data = read_arrays(path, "vocabulary")
        try:
            vocabulary = cls(
                centroids=np.asarray(data["centroids"], dtype=np.float32),
                projections=np.asarray(data["projections"], dtype=np.float32),
                medians=np.asarray(data["medians"], dtype=np.float32),
                trained_on=int(data["trained_on"][0]),
            )
        except (KeyError, IndexError, ValueError) as error:
            raise IndexCorruptError(f"vocabulary {path.name} is unreadable: {error}") from error
        k = vocabulary.half_words
        if (
            vocabulary.centroids.shape != (2, k, HALF)
            or vocabulary.projections.shape != (2, HALF, BITS_PER_HALF)
            or vocabulary.medians.shape != (2, k, BITS_PER_HALF)
        ):
            raise IndexCorruptError(f"vocabulary {path.name} has malformed arrays")
        return vocabulary


def _best_columns(scores: FloatArray, count: int) -> npt.NDArray[np.intp]:
    """Each row's ``count`` highest columns, highest first.

    A few argmax passes, masking each winner in place (``scores`` is changed):
    for the one or two columns a query needs, 100 times cheaper than an
    argpartition of 1,024 columns.
    """
    rows = np.arange(len(scores))
    chosen = np.empty((len(scores), count), dtype=np.intp)
    for rank in range(count):
        chosen[:, rank] = np.argmax(scores, axis=1)
        if rank + 1 < count:
            scores[rows, chosen[:, rank]] = -np.inf
    return chosen


def half_words_for(descriptors: int, *, largest: int) -> int:
    """How many centroids each half gets when training on ``descriptors`` descriptors.

    k-means wants tens of points per centroid; a small collection gets a
    smaller vocabulary (a power of two, so that word ids stay compact).
    """
    wanted = max(descriptors // 32, 16)
    return int(min(largest, 1 << (wanted.bit_length() - 1)))


def train_vocabulary(
    descriptors: FloatArray, *, half_words: int, trained_on: int, seed: int = 0
) -> Vocabulary:
    """Train both half-codebooks and their Hamming embedding on ``descriptors`` (n, 64)."""
    rng = np.random.default_rng(seed)
    if len(descriptors) > MAX_TRAINING_HALVES:
        descriptors = descriptors[rng.choice(len(descriptors), MAX_TRAINING_HALVES, replace=False)]
    centroids, projections, medians = [], [], []
    projection_rng = np.random.default_rng(_PROJECTION_SEED)
    for side in range(2):
        half = np.ascontiguousarray(descriptors[:, side * HALF : (side + 1) * HALF])
        trained = train_centroids(half, centroids=half_words, seed=seed + side)
        if len(trained) < half_words:  # fewer descriptors than centroids: pad with copies
            trained = trained[np.arange(half_words) % len(trained)]
        # A random rotation's first columns: orthonormal directions, as in Jegou et al.
        rotation, _ = np.linalg.qr(projection_rng.standard_normal((HALF, HALF)))
        projection = rotation[:, :BITS_PER_HALF].astype(np.float32)
        projected = half @ projection
        assignment = np.argmax(
            half @ trained.T - 0.5 * np.einsum("ij,ij->i", trained, trained), axis=1
        )
        thresholds = np.tile(np.median(projected, axis=0), (half_words, 1))
        order = np.argsort(assignment, kind="stable")
        starts = np.searchsorted(assignment[order], np.arange(half_words + 1))
        for word in range(half_words):
            members = order[starts[word] : starts[word + 1]]
            if len(members) >= MIN_HALVES_FOR_MEDIANS:
                thresholds[word] = np.median(projected[members], axis=0)
        centroids.append(trained)
        projections.append(projection)
        medians.append(thresholds.astype(np.float32))
    return Vocabulary(
        centroids=np.stack(centroids).astype(np.float32),
        projections=np.stack(projections).astype(np.float32),
        medians=np.stack(medians).astype(np.float32),
        trained_on=trained_on,
    )
