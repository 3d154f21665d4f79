"""Shared fixtures: a small embedded dataset and the tiny checkpoints built from it, once per test session."""
import json

import pytest
import torch
from PIL import Image

from data.build import build
from data.tiny_student import build_tiny_student
from tests.tiny_checkpoints import build_tiny_internvl, build_tiny_qwen2vl, build_tiny_qwen3vl

SMALL = {"sft": 200, "train": 120, "val": 40, "test": 40}


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """A small embedded dataset (same generator as the default run, fewer rows)."""
    return build(tmp_path_factory.mktemp("data") / "embedded", seed=0, sizes=SMALL)


@pytest.fixture(scope="session")
def tiny_student(embedded, tmp_path_factory):
    """Path of the tiny Qwen2.5-VL student saved with save_pretrained (tokenizer and image processor
    included)."""
    return build_tiny_student(embedded, tmp_path_factory.mktemp("ckpt") / "tiny-student", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2vl(embedded, tmp_path_factory):
    """Path of a tiny Qwen2-VL checkpoint (tests/tiny_checkpoints.py)."""
    return build_tiny_qwen2vl(embedded, tmp_path_factory.mktemp("ckpt") / "tiny-qwen2vl")


@pytest.fixture(scope="session")
def tiny_internvl(embedded, tmp_path_factory):
    """Path of a tiny InternVL3 checkpoint in the transformers format (tests/tiny_checkpoints.py)."""
    return build_tiny_internvl(embedded, tmp_path_factory.mktemp("ckpt") / "tiny-internvl")


@pytest.fixture(scope="session")
def tiny_qwen3vl(embedded, tmp_path_factory):
    """Path of a tiny Qwen3-VL checkpoint, DeepStack included (tests/tiny_checkpoints.py)."""
    return build_tiny_qwen3vl(embedded, tmp_path_factory.mktemp("ckpt") / "tiny-qwen3vl")


@pytest.fixture(scope="session")
def tiny_qwen3vl_moe(embedded, tmp_path_factory):
    """Path of a tiny Qwen3-VL-MoE checkpoint (4 experts, 2 per token), a teacher
    (tests/tiny_checkpoints.py)."""
    return build_tiny_qwen3vl(embedded, tmp_path_factory.mktemp("ckpt") / "tiny-qwen3vl-moe", moe=True)


@pytest.fixture(scope="module")
def batch(embedded):
    """Four questions of different lengths: three images of different sizes (Qwen2.5-VL and Qwen3-VL: 9, 8
    and 6 image tokens; InternVL: 5, 3 and 3 tiles), one text-only."""
    rows = [json.loads(line) for line in open(embedded / "train.jsonl")][:4]
    images = [Image.open(embedded / r["image"]).convert("RGB") for r in rows]
    images = [images[0], images[1].resize((112, 56)), None, images[3].resize((56, 84))]
    return [r["question"] + " Think." * i for i, r in enumerate(rows)], images


@pytest.fixture
def one_thread():
    """Tiny matrices on a shared 2-core machine: one intra-op thread is several times faster than two
    (measured: a forward+backward of 8 x 174 tokens, 0.4 s vs 1.4 s); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
