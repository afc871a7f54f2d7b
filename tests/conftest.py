import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.append(str(TESTS))  # after the project, so tests/finetune never shadows finetune/


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a real BPE tokenizer and ChatML template, built once per test session."""
    from tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")
