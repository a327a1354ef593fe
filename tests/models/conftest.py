from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.tiny_llama import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama with a character tokenizer (built once per session)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
