"Shared fixtures: flux2-tiny (dev, klein) built once per session, offline."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import pytest


@pytest.fixture(scope="session")
def tiny_dev():
    from flux2_kit.tiny import flux2_tiny
    return flux2_tiny("dev")


@pytest.fixture(scope="session")
def tiny_klein():
    from flux2_kit.tiny import flux2_tiny
    return flux2_tiny("klein")
