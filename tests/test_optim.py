"""PagedAdamW (32-bit and 8-bit states) against torch.optim.AdamW: updates, saving, loading, bytes."""
import copy

import pytest
import torch
from hydra.utils import instantiate

from qlora.optim import PagedAdamW, PagedAdamW8bit
from tiny_models import VOCAB, build_model

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny(seed=0):
    model = build_model("llama", seed=seed)
    model.train()
    return model


def batches(count, seed=0):
    """Sequences counting up from a random start by a random stride of 1-3: learnable, never trivial."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        start = torch.randint(0, VOCAB, (4, 1), generator=generator)
        stride = torch.randint(1, 4, (4, 1), generator=generator)
        out.append((start + stride * torch.arange(16)) % VOCAB)
    return out


def train(model, optimizer, data):
    losses = []
    for ids in data:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def groups(model, lr=3e-3):
    """Two groups with their own hyperparameters: the norms without weight decay, at half the lr."""
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    rest = [p for n, p in model.named_parameters() if "norm" not in n]
    return [{"params": rest, "weight_decay": 0.1}, {"params": norms, "weight_decay": 0.0, "lr": lr / 2}]


def test_paged_adamw_matches_torch_adamw_over_50_steps():
    reference, paged = tiny(), tiny()
    data = batches(50)
    expected = train(reference, torch.optim.AdamW(groups(reference), lr=3e-3), data)
    # Pages of 20 KB: the embedding (8192 fp32 elements, 64 KB of state) is split over several.
    optimizer = PagedAdamW(groups(paged), lr=3e-3, page_size_mb=0.02)
    got = train(paged, optimizer, data)
    assert any(len(optimizer._layout.segments[p]) > 1 for p in paged.parameters())
    assert got == pytest.approx(expected, rel=1e-6)
    for (name, a), b in zip(reference.named_parameters(), paged.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("optimizer_class", [PagedAdamW, PagedAdamW8bit])
def test_state_dict_round_trip_resumes_exactly(optimizer_class, tmp_path):
    model = tiny()
    data = batches(8)
    optimizer = optimizer_class(groups(model), lr=3e-3, page_size_mb=0.05)
    train(model, optimizer, data[:4])
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    resumed_model = copy.deepcopy(model)
    continued = train(model, optimizer, data[4:])

    resumed = optimizer_class(groups(resumed_model), lr=3e-3, page_size_mb=0.05)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=False))
    assert train(resumed_model, resumed, data[4:]) == continued
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_loads_torch_adamw_state_and_torch_loads_ours():
    model = tiny()
    data = batches(6)
    reference = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, reference, data[:3])
    paged = PagedAdamW(model.parameters(), lr=1e-3)
    paged.load_state_dict(reference.state_dict())
    for index, state in reference.state_dict()["state"].items():
        ours = paged.state_dict()["state"][index]
        assert torch.equal(ours["exp_avg"], state["exp_avg"]) and torch.equal(ours["exp_avg_sq"], state["exp_avg_sq"])
        assert float(ours["step"]) == float(state["step"]) == 3
    back = torch.optim.AdamW(model.parameters(), lr=1e-3)
    back.load_state_dict(paged.state_dict())
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    twin_optimizer.load_state_dict(reference.state_dict())
    assert train(model, back, data[3:]) == train(twin, twin_optimizer, data[3:])


def test_8bit_loss_curve_stays_close_to_32bit_with_a_quarter_of_the_state_bytes():
    data = batches(120, seed=1)
    full, eight = tiny(), tiny()
    optimizer32 = PagedAdamW(groups(full), lr=3e-3)
    # 2048: the tiny model's k/v projections (64 x 32) count as large here, as LoRA matrices
    # (r x hidden, >= 16 x 4096) do in a real run with the default 4096.
    optimizer8 = PagedAdamW8bit(groups(eight), lr=3e-3, min_8bit_size=2048)
    curve32, curve8 = train(full, optimizer32, data), train(eight, optimizer8, data)
    assert curve32[-1] < 0.4 * curve32[0]
    # Stated tolerance, on means over windows of 10 steps (single steps are noisy): every window
    # within 8% of the 32-bit run's (5.5% measured), the last one within 3% (1.4% measured).
    window32 = [sum(curve32[i:i + 10]) / 10 for i in range(0, len(data), 10)]
    window8 = [sum(curve8[i:i + 10]) / 10 for i in range(0, len(data), 10)]
    gaps = [abs(a - b) / a for a, b in zip(window32, window8)]
    assert max(gaps) < 0.08 and gaps[-1] < 0.03, gaps
    assert optimizer8.state_bytes() <= 0.27 * optimizer32.state_bytes(), optimizer8.state_bytes() / optimizer32.state_bytes()


def test_8bit_optimizer_loads_a_32bit_state_within_quantization_error():
    model = tiny()
    reference = PagedAdamW(model.parameters(), lr=1e-3)
    train(model, reference, batches(3))
    eight = PagedAdamW8bit(model.parameters(), lr=1e-3)
    eight.load_state_dict(reference.state_dict())
    from qlora.kernels.optim.reference import dequantize_blockwise_8bit
    from qlora.quant import dynamic_map

    for index, state in reference.state_dict()["state"].items():
        ours = eight.state_dict()["state"][index]
        if ours["exp_avg"].dtype != torch.uint8:
            assert torch.equal(ours["exp_avg"], state["exp_avg"])  # under min_8bit_size: kept in fp32
            continue
        decoded = dequantize_blockwise_8bit(ours["exp_avg"].view(-1), ours["exp_avg_absmax"], dynamic_map(), 256)
        blocks_max = ours["exp_avg_absmax"].repeat_interleave(256)[:decoded.numel()]
        # The dynamic map's steps are at most ~7% of the value near 1, finer below.
        assert ((decoded - state["exp_avg"].view(-1)).abs() <= 0.04 * blocks_max + 1e-12).all()


def test_pages_bound_the_state_and_split_large_parameters():
    big = torch.nn.Parameter(torch.randn(100_000))
    small = torch.nn.Parameter(torch.randn(10))
    optimizer = PagedAdamW8bit([big, small], page_size_mb=0.01, min_8bit_size=1000)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    optimizer.step()
    page_bytes = int(0.01 * 2**20)
    assert all(page.nbytes <= page_bytes for page in optimizer._layout.pages)
    segments = optimizer._layout.segments[big]
    assert len(segments) > 1 and all(s.start % 256 == 0 for s in segments)
    assert sum(s.length for s in segments) == big.numel()
    assert optimizer._layout.segments[small][0].specs[0].dtype == torch.float32  # under min_8bit_size
    # 8-bit: one byte per moment and element, plus an fp32 absmax per 256.
    assert optimizer.state_bytes() == pytest.approx(2 * big.numel() * (1 + 4 / 256) + 8 * small.numel(), rel=0.02)


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": -1.0}, "lr must be >= 0"),
    ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"optim_bits": 4}, "optim_bits must be 8 or 32, got 4"),
    ({"page_size_mb": 0}, "page_size_mb must be > 0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PagedAdamW([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_loading_another_models_state_fails_clearly():
    model = tiny()
    optimizer = PagedAdamW(model.parameters())
    train(model, optimizer, batches(1))
    state = optimizer.state_dict()
    other = PagedAdamW([torch.nn.Parameter(torch.ones(p.numel() + 1)) for p in model.parameters()])
    with pytest.raises(ValueError, match="the checkpoint is of another model"):
        other.load_state_dict(state)


@pytest.mark.parametrize("option,expected", [("paged_adamw", PagedAdamW), ("paged_adamw_8bit", PagedAdamW8bit)])
def test_recipe_option_builds_the_optimizer(option, expected):
    from test_recipes import compose_with

    cfg = compose_with(f"optimizer={option}")
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.ones(5000))])
    assert type(optimizer) is expected and optimizer.paged
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr


# ---- CUDA: the paging itself --------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("optimizer_class", [PagedAdamW, PagedAdamW8bit])
def test_gpu_paged_states_stay_in_host_memory_and_match_unpaged(optimizer_class):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (16_000_000, 16_000_017, 4097, 10)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    page_mb = 2
    paged = optimizer_class(params, lr=1e-3, weight_decay=0.01, page_size_mb=page_mb)
    resident = optimizer_class(twins, lr=1e-3, weight_decay=0.01, paged=False)
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g, g.clone()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        paged.step()
        torch.cuda.synchronize()
        # Two page buffers plus the update's fp32 temporaries of one page's segments: O(page),
        # far below the states themselves (256 MB in 32 bits, 64 MB in 8).
        extra = torch.cuda.max_memory_allocated() - before
        assert extra <= 2 * page_mb * 2**20 + 48 * 2**20, extra
        assert extra < paged.state_bytes() / 2
        resident.step()
    assert all(page.storage.device.type == "cpu" and page.storage.is_pinned() for page in paged._layout.pages)
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=0, atol=0)


@requires_cuda
def test_gpu_paged_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (1_000_000, 333, 70_000)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    paged = PagedAdamW(params, lr=1e-3, weight_decay=0.01, page_size_mb=1)
    reference = torch.optim.AdamW(twins, lr=1e-3, weight_decay=0.01, foreach=False)
    for _ in range(50):
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        paged.step()
        reference.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-6, atol=1e-7)
