"""Session-scoped data fixtures: one tokenizer and one tokenised demo corpus for all data tests.

The tokenizer is the committed demo one (data/tokenizer/demo_8k.model); the corpus is built
once into a session temporary cache (about 3 s), so the tests never touch the repo's cache/.
"""

from __future__ import annotations

import pytest

from tests.helpers.data import DATA_SEQ_LENGTH


@pytest.fixture(scope="session")
def demo_tokenizer():
    from moe_morpheus.config.data import resolve_path
    from moe_morpheus.data.tokenizer import Tokenizer

    return Tokenizer(resolve_path("data/tokenizer/demo_8k.model"))


@pytest.fixture(scope="session")
def demo_data_cfg(tmp_path_factory):
    from moe_morpheus.config.data import DataConfig

    # A pinned data seed: build_data is called without a run to resolve it from.
    return DataConfig(cache_dir=str(tmp_path_factory.mktemp("data_cache")), seed=1234)


@pytest.fixture(scope="session")
def demo_data(demo_data_cfg):
    from moe_morpheus.data.dataset import build_data

    return build_data(demo_data_cfg, DATA_SEQ_LENGTH, progress=False)
