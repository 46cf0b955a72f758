"""Engine settings: what defines an index, and how a query is searched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from indexer.features import KazeParams
from indexer.moving import VideoLimits
from indexer.segments import VoteParams
from indexer.verify import VerifyParams

# Settings that change what is stored: an index keeps the values it was built with.
_STORED_KEYS = (
    "working_side",
    "min_side",
    "max_keypoints",
    "kaze_threshold",
    "kaze_octaves",
    "kaze_octave_layers",
    "kaze_enough_keypoints",
    "centroids",
    "dimensions",
    "keypoint_grid",
)
# What an index made before a stored setting existed was built with: it keeps that.
_LEGACY_VALUES = {"keypoint_grid": "0"}
# Queries detect at this fraction of the index's threshold (see query_kaze).
QUERY_THRESHOLD_FACTOR = 0.5


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Every tunable of the engine, with the defaults chosen in docs/BENCHMARKS.md."""

    # -- what an index is made of (fixed for an index once built) --
    working_side: int = 640  # longest side KAZE sees; cost grows with its square
    min_side: int = 400  # smaller photos are upscaled first: thumbnails describe better
    max_keypoints: int = 500  # strongest keypoints stored per image (68 bytes each)
    kaze_threshold: float = 0.001
    # KAZE keeps the full resolution at every level, and the diffusion time a
    # level needs grows with its scale: OpenCV's fourth octave costs about as much
    # as the first three together, for the coarsest 8% of the keypoints. Three
    # octaves (scales up to 8x) cost 0.64x the default, and recall stayed within
    # the spread between two builds of the same photos (docs/BENCHMARKS.md).
    # Indexes built with four keep four (a stored setting).
    kaze_octaves: int = 3
    kaze_octave_layers: int = 4
    kaze_enough_keypoints: int = 300
    # Keypoints are kept spread over a grid of this many cells a side, so that a
    # photo's most textured part cannot take all of them (0: the strongest only).
    keypoint_grid: int = 4
    centroids: int = 64
    dimensions: int = 256
    # -- how a query is answered (free to change between runs) --
    query_keypoints: int = 1000  # queries are not stored, so they may keep more
    # recall@10 0.99 at 1.8 ms up to ~10k images (docs/BENCHMARKS-speed-scale.md);
    # regional looks use a quarter of it, as they search 36 vectors at once.
    search_k: int = 16_000
    first_batch: int = 8  # candidates verified before deciding whether to look further
    verify_limit: int = 48  # most candidates verified for one query
    candidates_per_region: int = 12
    # Unverified candidates with this many inliers or more, the most first, get a
    # closer look when nothing verified (indexer/querying.py): unrelated photos
    # mostly reach 4 or 5, the originals of deep crops and thumbnails that fall
    # short 6 to 11 (docs/BENCHMARKS.md, "A closer look at the closest candidates").
    closer_looks: int = 2
    closer_look_inliers: int = 6
    rebuild_after_fresh: int = 500  # fresh images that trigger a background rebuild
    # ... or a tenth of the index, but never more than this: the fresh buffer is
    # searched exactly, 35 ms a vector at 100k (docs/BENCHMARKS-speed-scale.md).
    max_fresh: int = 10_000
    retrain_growth: float = 2.0  # retrain the codebook once the collection grew this much
    training_images: int = 20_000  # most images the codebook and PCA are trained on
    annoy_build_trees: int = 32
    # -- the inverted file (docs/BENCHMARKS.md, "Inverted file") --
    vocabulary_half_words: int = 1024  # words = its square: 2^20
    vocabulary_training_descriptors: int = 131_072
    vote: VoteParams = field(default_factory=VoteParams)
    vote_candidates: int = 32  # best-voted images that take part in the fusion
    # The quick look, before the first: the query's strongest descriptors vote on
    # their rarest words alone, within a budget of postings, and the best two are
    # verified. Most copies are found there at a cost that does not grow with the
    # collection; the rest take the first look as before (None: no quick look).
    # docs/BENCHMARKS.md, "The quick look".
    quick_vote: VoteParams | None = field(
        default_factory=lambda: VoteParams(voting_descriptors=300, posting_budget=20_000)
    )
    seal_after: int = 256  # images in memory before they are written as a segment
    merge_factor: int = 8  # adjacent segments of one size class merged into one
    segment_images: int = 131_072  # images per segment written by a rebuild
    max_file_bytes: int = 50 * 2**20
    max_pixels: int = 60_000_000
    verify: VerifyParams = field(default_factory=VerifyParams)
    # -- moving pictures (videos, animations, video stickers; see indexer/moving.py) --
    video_frames: int = 8  # most frames of one moving picture kept in the index
    # Frames of a moving query described, one after the other, while none verifies:
    # each costs about a photo query's extraction (docs/BENCHMARKS.md, "Moving pictures").
    query_video_frames: int = 3
    max_video_seconds: float = 600.0
    max_video_pixels: int = 3840 * 2160
    video_read_seconds: float = 30.0  # past this, reading one video's frames is given up

    @property
    def video_limits(self) -> VideoLimits:
        return VideoLimits(
            max_seconds=self.max_video_seconds,
            max_pixels=self.max_video_pixels,
            read_seconds=self.video_read_seconds,
        )

    def rebuild_threshold(self, indexed: int) -> int:
        """Changes since the last build (adds and removals) that trigger the next
        one, for an index of ``indexed`` images: rebuilds grow rarer as the index
        grows, but the exactly searched buffer stays small."""
        return min(max(self.rebuild_after_fresh, indexed // 10), self.max_fresh)

    @property
    def query_kaze(self) -> KazeParams:
        """KAZE for queries: half the index's threshold, a quarter if that finds too few.

        Keypoints found at a threshold are (almost) a subset of those found at a
        lower one, so a query detected a little lower than the index finds what
        the index kept, without the index's retries. Half rather than a quarter:
        the same recall in the quality benchmark, 1.21x a bare default pass
        instead of 1.35x. The second pass is for photos that are mostly flat (a
        large part covered, a tiny thumbnail), whose few keypoints describe them
        badly (docs/BENCHMARKS.md).
        """
        stored = self.kaze
        return replace(
            stored,
            threshold=stored.threshold * QUERY_THRESHOLD_FACTOR,
            retries=1,
            retry_divisor=2.0,
        )

    @property
    def kaze(self) -> KazeParams:
        return KazeParams(
            threshold=self.kaze_threshold,
            octaves=self.kaze_octaves,
            octave_layers=self.kaze_octave_layers,
            enough_keypoints=self.kaze_enough_keypoints,
            grid=self.keypoint_grid,
        )

    def stored(self) -> dict[str, str]:
        """The index-defining settings, as saved in the catalog."""
        values = asdict(self)
        return {key: repr(values[key]) for key in _STORED_KEYS}

    def with_stored(self, stored: dict[str, str]) -> EngineSettings:
        """These settings with the index-defining ones taken from an existing index."""
        types = {f.name: f.type for f in fields(self)}
        overrides: dict[str, int | float] = {}
        for key in _STORED_KEYS:
            value = stored.get(key, _LEGACY_VALUES.get(key))
            if value is not None:
                overrides[key] = float(value) if types[key] == "float" else int(value)
        return replace(self, **overrides)  # type: ignore[arg-type]
