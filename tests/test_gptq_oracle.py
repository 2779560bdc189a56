"""GPTQModel as an oracle: its checkpoints load in qlora with the same logits, qlora's load in it,
and qlora's quantizer's per-layer error on the same calibration is within a stated margin of its.

GPTQModel is not a dependency (it pins numpy to an older release and pulls torchao): these tests
run where it is installed (the `oracle` extra, in an environment of its own: docs/formats.md, "GPTQ bases")
and skip elsewhere, where tests/golden/gptq_vectors.json still pins the packing. It runs in a
child process (tests/gptq_oracle_worker.py): importing it patches transformers, which must not
leak into the rest of the suite.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("gptqmodel") is None:  # not importorskip: the import itself patches transformers
    pytest.skip("GPTQModel is not installed (the `oracle` extra); tests/golden pins the GPTQ format instead",
                allow_module_level=True)

import qlora  # noqa: E402
from qlora.models.gptq_calibration import calibration_samples  # noqa: E402
from qlora.quant.gptq.solver import HessianAccumulator, quantization_error  # noqa: E402
from helpers import rel_err  # noqa: E402
from tiny_run import WORDS, save_tiny_model_with_tokenizer  # noqa: E402

WORKER = Path(__file__).with_name("gptq_oracle_worker.py")
SEQLEN, WINDOWS, GROUP, DAMP = 64, 16, 32, 0.1  # the tiny Llama's whole context; 1024 calibration tokens
CASES = {"b4": (4, False), "b4_act_order": (4, True), "b3": (3, False), "b8": (8, False), "b2": (2, False)}
FP16_UNIT_ROUNDOFF = 2.0**-11


def run_worker(jobs: list[dict], cwd: Path) -> None:
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
    # cwd: GPTQModel writes a logs/ folder there.
    result = subprocess.run([sys.executable, str(WORKER), json.dumps(jobs)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def calibration_texts(count=48, words=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (words,), generator=generator))
            for _ in range(count)]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Per case: GPTQModel's checkpoint and qlora's, both quantized from the same dense tiny Llama on
    the same calibration windows, and GPTQModel's forward of each."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("oracle")
    dense = save_tiny_model_with_tokenizer(root / "dense")
    texts = calibration_texts()
    windows = calibration_samples(texts, AutoTokenizer.from_pretrained(dense), SEQLEN, WINDOWS)
    assert len(windows) == WINDOWS
    torch.save([w[0] for w in windows], root / "calibration.pt")
    probe = torch.randint(4, len(WORDS) + 4, (2, SEQLEN), generator=torch.Generator().manual_seed(1))
    torch.save(probe, root / "probe.pt")
    jobs = []
    for case, (bits, desc_act) in CASES.items():
        jobs.append({"op": "quantize", "dense": str(dense), "out": str(root / f"theirs_{case}"),
                     "calibration": str(root / "calibration.pt"), "bits": bits, "group_size": GROUP,
                     "desc_act": desc_act, "damp_percent": DAMP})
        config = qlora.GPTQQuantConfig(bits=bits, group_size=GROUP, desc_act=desc_act, damp_percent=DAMP, dataset=texts,
                                       model_seqlen=SEQLEN, max_calibration_samples=WINDOWS,
                                       compute_dtype=torch.float32)
        ours = qlora.load_model(dense, quantization_config=config, device="cpu", progress=False)
        qlora.save_model(ours, root / f"ours_{case}")
        for side in ("theirs", "ours"):
            jobs.append({"op": "forward", "checkpoint": str(root / f"{side}_{case}"), "input_ids": str(root / "probe.pt"),
                         "out": str(root / f"forward_{side}_{case}.pt")})
    # Quantize jobs come before the forwards that read qlora's checkpoints: all were written above.
    run_worker(sorted(jobs, key=lambda job: job["op"] != "quantize"), cwd=root)
    return root, dense, windows, probe


def qlora_forward(checkpoint: Path, probe: torch.Tensor):
    model = qlora.load_model(checkpoint, qlora.GPTQQuantConfig(compute_dtype=torch.float32), device="cpu",
                             dtype=torch.float32, progress=False)
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    weights = {name: module.dequantize(torch.float32) for name, module in model.named_modules()
               if isinstance(module, qlora.LinearGPTQ)}
    return logits, weights


def logits_tolerance() -> float:
    """GPTQModel computes in fp16 on CPU (unit roundoff u = 2^-11), qlora here in fp32 from the same
    decoded weights (checked equal first), so the logits differ by the fp16 roundings of the
    activations: a few u (measured 1.3u to 1.4u on every case). 8u leaves room for another machine's
    summation order; a layer wired wrongly (a lost bias, a transposed or misplaced weight) moves the
    logits by tens of percent."""
    return 8 * FP16_UNIT_ROUNDOFF


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_gptqmodel_checkpoint_loads_in_qlora_with_the_same_weights_and_logits(oracle, case):
    assert_both_decode_alike(oracle, f"theirs_{case}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_qlora_checkpoint_loads_in_gptqmodel_with_the_same_weights_and_logits(oracle, case):
    assert_both_decode_alike(oracle, f"ours_{case}")


def assert_both_decode_alike(oracle, checkpoint: str) -> None:
    """The checkpoint `checkpoint` (written by GPTQModel: theirs_*, or by qlora: ours_*) read by both
    tools: every layer's W^T as GPTQModel decodes it, fp16, the same values exactly; the logits within
    the tolerance above."""
    root, _, _, probe = oracle
    theirs = torch.load(root / f"forward_{checkpoint}.pt")
    logits, weights = qlora_forward(root / checkpoint, probe)
    assert len(weights) == len(theirs["weights"]) == 14
    for name, weight in weights.items():
        assert torch.equal(weight.t().to(torch.float16), theirs["weights"][name]), name
    assert rel_err(logits, theirs["logits"]) < logits_tolerance()


def dense_hessians(dense: Path, windows) -> dict[str, torch.Tensor]:
    """H = 2 X X^T / n of every decoder linear's inputs in the dense model on the calibration windows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    accumulators, hooks = {}, []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            accumulators[f"model.layers.{name}"] = acc = HessianAccumulator(module.in_features, "cpu")
            hooks.append(module.register_forward_pre_hook(lambda mod, args, acc=acc: acc.add(args[0])))
    with torch.no_grad():
        for ids in windows:
            model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return {name: acc.hessian for name, acc in accumulators.items()}, dict(model.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_per_layer_error_is_within_the_margin_of_gptqmodels(oracle, case, capsys):
    """The error of a layer, ||W X - Q X||^2 / n = tr((W - Q) H (W - Q)^T) / 2, measured for both
    quantizers on the same yardstick: the dense model's inputs on the calibration windows.

    Both run the published algorithm with the same options on the same windows; they differ in
    rounding details (qlora rounds each group's scale to fp16 before quantizing against it,
    GPTQModel after; Hessian accumulation order; fp32 vs fp64 steps), and with true_sequential each
    layer sees inputs from its own already-quantized predecessors, so the errors are close but not
    equal. The margin: the sum over layers within 5% of GPTQModel's (measured: -0.2% to +0.3% at
    3/4/8 bits, +2.8% at 2 bits, where a code that flips by one step costs a quarter of the range),
    and no single layer worse by more than 25% (measured worst: +4% at 3/4/8 bits, +17% at 2 bits).
    Round-to-nearest on the same grid is 1.3x to 1.4x worse than GPTQModel on this yardstick."""
    root, dense, windows, _ = oracle
    hessians, params = dense_hessians(dense, windows)
    _, ours = qlora_forward(root / f"ours_{case}", windows[0])
    _, theirs = qlora_forward(root / f"theirs_{case}", windows[0])  # decoded exactly as GPTQModel does (test a)
    errors = {}
    for name, hessian in hessians.items():
        w = params[f"{name}.weight"].detach()
        errors[name] = (quantization_error(w, ours[name], hessian), quantization_error(w, theirs[name], hessian))
    total_ours, total_theirs = (sum(e[i] for e in errors.values()) for i in (0, 1))
    bits = CASES[case][0]
    total_rtn = sum(quantization_error(params[f"{name}.weight"].detach(),
                                       qlora.GPTQWeight.quantize(params[f"{name}.weight"].detach(), bits=bits,
                                                                 group_size=GROUP).dequantize(torch.float32), hessian)
                    for name, hessian in hessians.items())
    with capsys.disabled():
        print(f"\n{case}: sum of per-layer errors qlora {total_ours:.6g}, GPTQModel {total_theirs:.6g}, "
              f"ratio {total_ours / total_theirs:.4f}; worst layer ratio "
              f"{max(o / t for o, t in errors.values()):.4f}; round-to-nearest / GPTQModel {total_rtn / total_theirs:.3f}")
    assert total_theirs < total_rtn  # the yardstick separates GPTQ from plain rounding
    assert total_ours < 1.05 * total_theirs
    for name, (o, t) in errors.items():
        assert o < 1.25 * t, (name, o, t)
