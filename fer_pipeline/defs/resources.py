"""Every Dagster resource of the code location: the settings of the data half (``fer``), of
training (``training``) and of the evaluation assets (``analysis``), and the Label Studio
connection of the review loop (``label_studio``, from the environment, not the settings file). Their values come from the
settings file when the code location loads (:mod:`fer_pipeline.defs.settings`); the defaults
here are the full recipe. A launchpad run config may override a knob for one run (recorded).
The core modules get plain values from the properties and methods below."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg
from pydantic import Field, PrivateAttr, field_validator

from fer_pipeline.analysis.bias import ATTRIBUTES
from fer_pipeline.dedup.views import ViewRule
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.limits import MAX_BYTES_IN_FLIGHT, MAX_FILE_BYTES
from fer_pipeline.ml.pretrain import PretrainConfig
from fer_pipeline.ml.train import TrainConfig
from fer_pipeline.paths import FACES_DIR, DataPaths, data_root_setting, is_store_url
from fer_pipeline.publish import KEEP_REJECTED
from fer_pipeline.quality.face_check import NO_FACE, FaceCheck
from fer_pipeline.quality.flags import QUALITY_FLAGS, unknown_flags
from fer_pipeline.review.label_studio import ReviewClient
from fer_pipeline.sources.catalog import Catalog, CatalogError, load_catalog
from fer_pipeline.storage import ObjectStore


class FerSettings(dg.ConfigurableResource):
    """Settings of the data half (defaults match docs/settings.md)."""

    data_root: str = Field(default="", description="Data root: a folder, or an object-store URL (s3://bucket/prefix, "
                           "gs://...) mirrored into a local working copy; empty = $FER_DATA_DIR or ./data")
    working_copy: str = Field(default="", description="Local working copy of an object-store data root; empty = "
                              "$FER_WORKING_COPY or a folder per URL under ~/.cache/fer-pipeline")
    image_size: int = Field(default=48, description="Processed faces are image_size × image_size grayscale")
    min_side: int = Field(default=32, description="Reject images smaller than this (pixels)")
    max_pixels: int = Field(default=40_000_000, description="Larger images are rejected as decompression bombs")
    max_file_bytes: int = Field(default=MAX_FILE_BYTES, description="Files and archive entries larger than this "
                                "(declared or actually read) are rejected unread: memory stays bounded on "
                                "decompression bombs and oversized files")
    max_bytes_in_flight: int = Field(default=MAX_BYTES_IN_FLIGHT, gt=0, description="File bytes the faces "
                                     "stage holds at once (read, not yet decoded): memory is bounded by bytes, "
                                     "whatever the file sizes; a single larger file still proceeds, alone")
    min_std: float = Field(default=3.0, description="Reject near-constant faces (pixel std below this)")
    phash_max_distance: int = Field(default=4, description="Near-duplicate threshold (Hamming bits of 64)")
    match_mirrored: bool = Field(default=True, description="Also treat mirrored copies as near-duplicates")
    min_correlation: float = Field(default=0.95, description="Confirm phash matches by pixel correlation "
                                   "(0 = trust the perceptual hash alone)")
    view_duplicates: bool = Field(default=True, description="Also link re-cropped copies pHash misses (shifted, "
                                  "scaled, rotated crops) by the multi-view descriptor and margin test")
    view_margin: float = Field(default=ViewRule.margin, ge=0, le=1, description="A view pair's similarity must beat "
                               "both faces' best third face by this much (calibrated by benchmarks/bench_view_duplicates.py)")
    view_min_similarity: float = Field(default=ViewRule.min_similarity, ge=0, le=1, description="and reach this "
                                       "similarity (best cosine of the blurred centres over 54 views)")
    train_share: float = 0.70
    validation_share: float = 0.15
    test_share: float = 0.15
    n_folds: int = Field(default=10, description="Cross-validation folds over train+validation")
    split_seed: int = 0
    split_tolerance: float = Field(default=0.03, description="Allowed deviation of split shares")
    min_images_per_class: int = Field(default=20, description="Blocking check: each class at least this many")
    max_imbalance_ratio: float = Field(default=3.0, description="Warning check: largest/smallest class")
    workers: int = Field(default=0, description="Decoding processes; 0 = one per CPU core")
    rebuild: bool = Field(default=False, description="Reprocess everything from scratch: hash, decode and "
                          "compare every file again instead of reusing caches (the nightly safety net)")
    framing_max_share: float = Field(default=0.3, description="Warning check face_framing: a 'faces: detect' "
                                     "source warns when more than this share of its images has no face, several "
                                     "faces, or a face filling the frame (it is probably crops, or photos of groups)")
    exclude_flags: list[str] = Field(default=[], description="Image-quality flags whose faces the manifest "
                                     "excludes (stage 'quality', the flag's reason), e.g. [blurred, dark]; "
                                     f"empty = flagged faces stay and go up the review queue. One of: "
                                     f"{', '.join(QUALITY_FLAGS)}")
    face_check: bool = Field(default=False, description="Flag faces the face detector finds no face in "
                             "(no_face; about 13 ms a face once, cached): for photographs, not drawn faces. "
                             "Naming no_face in exclude_flags turns it on too")

    @field_validator("exclude_flags")
    @classmethod
    def _known_flags(cls, value: list[str]) -> list[str]:
        bad = unknown_flags(value)
        if bad:
            raise ValueError(f"unknown quality flag(s) {', '.join(map(repr, bad[:5]))}; "
                             f"known: {', '.join(QUALITY_FLAGS)}")
        return list(dict.fromkeys(value))

    _store: ObjectStore | None = PrivateAttr(default=None)
    _sources_pulled: bool = PrivateAttr(default=False)

    @property
    def store(self) -> ObjectStore | None:
        """The object store behind an URL data root (None for a folder)."""
        root = data_root_setting(self.data_root)
        if self._store is None and is_store_url(root):
            self._store = ObjectStore(root, self.working_copy or None)
        return self._store

    @property
    def paths(self) -> DataPaths:
        """Where the stages read and write: the data root, or the working copy of an URL data root."""
        if self.store is not None:
            return self.store.paths
        return DataPaths(Path(data_root_setting(self.data_root)).expanduser().resolve())

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """URL data root: check the store (a bad URL or bucket fails here, before any step), then
        pull what steps read; outside a run (the sensor) the catalogue and its sources instead."""
        if self.store is None:
            return
        log = context.log.info if context.log else None
        self.store.open()
        if context.run is not None:
            report = self.store.pull_published(run_id=context.run.run_id, log=log)
        else:
            report, self._sources_pulled = self.store.pull_sources(log=log), True
        if log:
            log(f"pulled {self.store.url} into {self.store.local}: {report.summary()}")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Push what the step wrote. The local publish already keeps the published set one run's
        set (a failed blocking check publishes nothing), so pushing its files is safe. Dagster
        records a failed teardown as an engine event, not a failed step: say it as an error too."""
        if self._store is None or context.run is None:
            return
        try:
            self._store.push(run_id=context.run.run_id, keep_candidates=KEEP_REJECTED,
                             log=context.log.info if context.log else None)
        except Exception as exc:
            if context.log:
                context.log.error(f"outputs NOT pushed to {self._store.url}: {exc}. They stay in the working copy "
                                  f"{self._store.local}; the next push from it sends them, unless the store changed "
                                  "them meanwhile (then the next pull takes the store's version)")
            raise

    @property
    def face_check_rule(self) -> FaceCheck | None:
        """The ``no_face`` check, or None when neither ``face_check`` nor ``exclude_flags`` asks for it."""
        return FaceCheck() if self.face_check or NO_FACE in self.exclude_flags else None

    def face_check_cache(self) -> Path:
        """Where the detector's scores are cached: beside the faces they are about."""
        check = FaceCheck()
        return Path(self.paths.root) / FACES_DIR / self.preprocess.key / check.cache_name()

    @property
    def view_rule(self) -> ViewRule | None:
        """The re-cropped-copy rule of the de-duplication, or None when ``view_duplicates`` is off."""
        return ViewRule(self.view_margin, self.view_min_similarity) if self.view_duplicates else None

    @property
    def preprocess(self) -> PreprocessSettings:
        return PreprocessSettings(image_size=(self.image_size, self.image_size), min_side=self.min_side,
                                  max_pixels=self.max_pixels, min_std=self.min_std)

    @property
    def split_proportions(self) -> dict[str, float]:
        return {"train": self.train_share, "validation": self.validation_share, "test": self.test_share}

    def catalog(self) -> Catalog:
        paths = self.paths
        if self.store is not None and not self._sources_pulled:  # only the steps that read sources fetch them
            self.store.pull_sources()
            self._sources_pulled = True
        if self.store is not None and not paths.catalog.is_file():
            raise CatalogError(f"{paths.catalog.name} not found in the data root {self.store.url}")
        return load_catalog(paths.catalog, paths.root)


class TrainSettings(dg.ConfigurableResource):
    """Training recipe knobs (the rest of :class:`TrainConfig` keeps its tuned defaults)."""

    epochs: int = Field(default=40, description="Maximum epochs per model")
    patience: int = Field(default=12, description="Early stopping: epochs without val macro-F1 gain")
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    device: str = Field(default="auto", description="auto = CUDA when available, else CPU")
    num_threads: int = Field(default=0, description="torch CPU threads; 0 = torch default")
    amp: str = Field(default="auto", description="auto = bf16 autocast on a CUDA GPU that supports it (never on "
                     "the CPU); off = full precision everywhere")
    cuda_graphs: bool = Field(default=True, description="On CUDA, replay each training step as one captured "
                              "CUDA graph (about 5x faster for these small models); false = eager steps")
    macro_f1_floor: float = Field(default=0.5, description="Warn when a model's test macro-F1 is below")
    init: str = Field(default="pretrained", description="pretrained = start the main architecture (models, CV "
                      "folds, held-out sources, mitigation) from the backbone pretrained on the pool when there is "
                      "one; scratch = random weights")
    pretrain_epochs: int = Field(default=15, description="Epochs of backbone pretraining on the pool's labels")
    pretrain_max_images: int = Field(default=24_000, description="At most this many pool images (stratified, "
                                     "seeded sample); 0 = all")
    pretrain_min_images: int = Field(default=100, description="A smaller pool trains no backbone")

    def pretrain_config(self) -> PretrainConfig:
        return PretrainConfig(epochs=self.pretrain_epochs, max_images=self.pretrain_max_images,
                              min_images=self.pretrain_min_images)

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, patience=self.patience, batch_size=self.batch_size, lr=self.lr,
                           seed=self.seed, device=self.device, num_threads=self.num_threads or None,
                           amp=self.amp, cuda_graphs=self.cuda_graphs)


class AnalysisSettings(dg.ConfigurableResource):
    """Knobs of the evaluation assets. Defaults are the full settings; ``configs/demo.yaml``
    shrinks the budget ones (epochs) for the five-minute demo. The number of CV folds is not
    here: it sizes the ``cv_fold`` partitions, fixed when the code location loads (``cv_folds``
    in the settings file, :mod:`fer_pipeline.defs.jobs`); which folds or held-out sources run is
    which partitions are materialized."""

    # cross-validation
    cv_epochs: int = Field(default=0, description="Max epochs per CV fold; 0 = training.epochs")
    cv_patience: int = Field(default=-1, description="Early-stopping patience per fold; -1 = training.patience")
    # bias
    bias_attributes: list[str] = Field(default=list(ATTRIBUTES),
                                       description="Demographic attributes to analyse (those present)")
    min_group_size: int = Field(default=30, description="Groups with fewer test images are 'too small to judge'")
    max_group_gap_points: float = Field(default=5.0, description="Warn when a judged group's macro-F1 is more "
                                        "than this many points below the overall")
    # mitigation
    mitigation: str = Field(default="reweight", description="off | oversample | reweight | both")
    mitigation_attribute: str = Field(default="auto", description="Attribute whose groups are balanced; "
                                      "auto = the one with the smallest group share in the training split")
    mitigation_min_share: float = Field(default=0.25, description="Target minimum share of each known group "
                                        "(capped at 1/number of groups)")
    mitigation_epochs: int = Field(default=0, description="Max epochs of the mitigated model; 0 = training.epochs")
    # source confound
    confound_max_share: float = Field(default=0.9, description="Warn when a class comes more than this share "
                                      "from one source while other classes do not")
    # leave-one-source-out
    loso_epochs: int = Field(default=0, description="Max epochs per held-out source; 0 = training.epochs")
    loso_min_classes: int = Field(default=2, description="Hold out only sources covering at least this many "
                                  "classes")
    # label issues
    label_issue_ranking: str = Field(default="self_confidence", description="self_confidence | normalized_margin")
    label_issue_grid: int = Field(default=24, description="Top suspects shown in the thumbnail grid")

    def recipe(self, training: TrainSettings, epochs: int, patience: int = -1) -> TrainConfig:
        """The main training recipe with this asset's epoch budget (0/-1 = as in ``training``)."""
        cfg = training.config()
        return replace(cfg, epochs=epochs or cfg.epochs, patience=cfg.patience if patience < 0 else patience)


LABEL_STUDIO_URL_ENV = "FER_LABEL_STUDIO_URL"
LABEL_STUDIO_KEY_ENV = "FER_LABEL_STUDIO_API_KEY"
LABEL_STUDIO_PROJECT_ENV = "FER_LABEL_STUDIO_PROJECT"
NO_LABEL_STUDIO = "no Label Studio configured"


class LabelStudioSettingError(ValueError):
    """A Label Studio connection setting that cannot work; the message names the field."""


class LabelStudio(dg.ConfigurableResource):
    """The Label Studio server of the review loop (docs/review.md). Unset (no URL) = the loop is off:
    the review assets record "no Label Studio configured" and the sensor skips. Each field falls back
    to its environment variable, read when used (so the token never sits in a settings file or the
    UI's run config): ``FER_LABEL_STUDIO_URL``, ``FER_LABEL_STUDIO_API_KEY``, ``FER_LABEL_STUDIO_PROJECT``."""

    url: str = Field(default="", description="Label Studio's base URL (http://host:port); empty = "
                     f"${LABEL_STUDIO_URL_ENV}; neither = the review loop is off")
    api_key: str = Field(default="", description=f"An access token of the reviewer account; empty = "
                         f"${LABEL_STUDIO_KEY_ENV}")
    project: str = Field(default="", description=f"Title of the review project (created when absent); empty = "
                         f"${LABEL_STUDIO_PROJECT_ENV}, else 'fer-pipeline review'")
    push_top_n: int = Field(default=100, ge=0, description="The queue's top N images are pushed as tasks")
    timeout_s: float = Field(default=30.0, gt=0, description="Seconds one HTTP request may take")

    @property
    def base_url(self) -> str:
        return (self.url or os.environ.get(LABEL_STUDIO_URL_ENV, "")).strip()

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)

    @property
    def project_title(self) -> str:
        return (self.project or os.environ.get(LABEL_STUDIO_PROJECT_ENV, "")).strip() or "fer-pipeline review"

    def checked(self) -> tuple[str, str]:
        """(URL, token), or :class:`LabelStudioSettingError` naming the field that cannot work."""
        url = self.base_url
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise LabelStudioSettingError(f"label_studio.url ({LABEL_STUDIO_URL_ENV}) = {url[:200]!r} is not an "
                                          "http(s)://host[:port] URL")
        key = (self.api_key or os.environ.get(LABEL_STUDIO_KEY_ENV, "")).strip()
        if not key:
            raise LabelStudioSettingError(f"label_studio.api_key ({LABEL_STUDIO_KEY_ENV}) is empty, but "
                                          f"label_studio.url is set to {url}: give the reviewer account's token")
        return url.rstrip("/"), key

    def client(self) -> ReviewClient:
        url, key = self.checked()
        return ReviewClient(url, key, self.project_title, timeout=self.timeout_s)
