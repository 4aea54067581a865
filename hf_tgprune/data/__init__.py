"""Image-classification data: loading, splits and calibration samples, model-specific transforms, collation.

One module each: `loading` (datasets and their columns), `splits` (validation carving, the calibration sampler),
`transforms` (what the model expects: data config, augmentations, transforms), `collate` (batches).
"""

from .collate import (  # noqa: F401
    collate_fn,
)
from .loading import (  # noqa: F401
    DATASET_PRESETS,
    IMAGE_COLUMN,
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN,
    LABEL_COLUMN_CANDIDATES,
    TEST_SPLIT_CANDIDATES,
    DataError,
    DatasetPreset,
    detect_columns,
    label_mappings,
    label_names,
    load_image_dataset,
    register_dataset_preset,
)
from .splits import (  # noqa: F401
    DataSplits,
    deterministic_sample,
    limit_samples,
    resolve_splits,
    sample_calibration,
    split_train_validation,
)
from .transforms import (  # noqa: F401
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_IMAGE_MAX_SIZE,
    Augmentation,
    DataConfig,
    ImageClassificationTransform,
    ToRGB,
    accepts_image_size,
    available_augmentations,
    build_transforms,
    data_config_from_image_processor,
    native_image_size,
    register_augmentation,
    resolve_data_config,
    set_transforms,
)
