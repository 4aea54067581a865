import os
import sys
from pathlib import Path

# the recipe's own helpers (recipes/recipe_utils.py, recipes/plots.py) are not part of the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.utils import IMAGE_SIZE, NUM_LABELS, RandomImages, make_model  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def images():
    return RandomImages(24)
