"""Shared fixtures: a small embedded dataset and the tiny student built from it, once per test session."""
import pytest

from data.build import build
from data.tiny_student import build_tiny_student

SMALL = {"sft": 200, "train": 120, "val": 40, "test": 40}


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """A small embedded dataset (same generator as the default run, fewer rows)."""
    return build(tmp_path_factory.mktemp("data") / "embedded", seed=0, sizes=SMALL)


@pytest.fixture(scope="session")
def tiny_student(embedded, tmp_path_factory):
    """Path of the tiny Qwen2.5-VL student saved with save_pretrained (tokenizer and image processor included)."""
    return build_tiny_student(embedded, tmp_path_factory.mktemp("ckpt") / "tiny-student", seed=0)
