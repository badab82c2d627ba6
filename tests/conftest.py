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


@pytest.fixture(scope="module", autouse=True)
def no_accelerate_state():
    """Each test file starts like a fresh kernel: no single-process accelerate state left by an earlier file's in-process
    Trainer (`launch` rightly refuses to fork beside one)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    if not (dist.is_available() and dist.is_initialized()): AcceleratorState._reset_state(reset_partial_state=True)
    yield
