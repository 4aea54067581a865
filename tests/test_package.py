"""The public surface of `hf_tgprune`: what users need, nothing mutable, the installed version."""

from importlib.metadata import version

import hf_tgprune


def test_version_comes_from_the_package_metadata():
    assert hf_tgprune.__version__ == version("hf_tgprune")


def test_every_public_name_exists_and_no_registry_dict_or_mixin_is_exported():
    for name in hf_tgprune.__all__:
        assert hasattr(hf_tgprune, name), name
    exported = {name: getattr(hf_tgprune, name) for name in hf_tgprune.__all__}
    assert not [name for name, value in exported.items() if isinstance(value, (dict, list, set))]
    assert not [name for name in exported if name.endswith("Mixin") or name.isupper()]
    assert {"TeacherGuidedPruningConfig", "TeacherGuidedPruningTrainer", "compute_importance_scores"} <= set(exported)
