import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Scores the trainer remembers (qlora.train.base_score) go to a folder of this test session's."""
    import os

    previous = os.environ.get("QLORA_CACHE_DIR")
    os.environ["QLORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("qlora_cache"))
    yield
    if previous is None:
        os.environ.pop("QLORA_CACHE_DIR", None)
    else:
        os.environ["QLORA_CACHE_DIR"] = previous


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """torch's intra-op threads for the test: the CPU kernels split work by them."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
