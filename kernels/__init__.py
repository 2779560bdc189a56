"""The kernels (installed as qlora.kernels). Import nothing from the rest of qlora.

One folder per weight format, each with its PyTorch twins (`reference`, the CPU path and the test
oracle), its Triton kernels, its custom ops and dispatch rule (`ops`) and its dispatch table
(data): `nf4/` (NF4/FP4, bitsandbytes' 4-bit layout), `int8/` (LLM.int8), `gptq/` (GPTQ v1); and
`optim/`, the fused 8-bit AdamW step. Shared by all: `backend` (the QLORA_BACKEND switch),
`dtypes`, `launch` (every Triton launch goes through `launch.launch`, so `launch.compile_only(arch)`
can compile the real launches for a GPU on a machine without one), `machine_code` (registers,
spills and the instruction mix of the result) and `selfcheck` (each Triton path checked against its
twin on first use). The Triton modules are imported on first use, so the CPU path never imports
triton, and a process that sets TRITON_INTERPRET=1 before that first use gets interpreted kernels.

Names kept here for the 4-bit format, QLoRA's default: `Packed4bit`, `linear_4bit`, `ops`,
`reference`, `formats`; and `adamw8bit_update_`.
"""
if __name__ == "qlora.kernels":
    from qlora.kernels.backend import get_backend, set_backend
    from qlora.kernels.nf4 import format as formats, ops, reference
    from qlora.kernels.nf4.linear import Linear4bitFunction, linear_4bit
    from qlora.kernels.nf4.packed import Packed4bit
    from qlora.kernels.optim.ops import adamw8bit_update_

    __all__ = ["Linear4bitFunction", "Packed4bit", "adamw8bit_update_", "formats", "get_backend", "linear_4bit",
               "ops", "reference", "set_backend"]
else:
    # This folder was found by its own name: Python started in the repository root (a REPL, `python -c`,
    # Jupyter, `python -m pytest`) puts the root first on sys.path, and `kernels` is also Hugging Face's
    # kernel-hub package, which transformers imports while loading a model. Hand the name over to that
    # package, found on the rest of sys.path, exactly as if the root were not there; where it is not
    # installed, `import kernels` fails as it would without this folder.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = _util.module_from_spec(_spec)
    # The import system returns what sys.modules holds once this file has run: the real package.
    _sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
