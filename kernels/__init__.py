"""Packed weight formats and the modules that run them.

`intpack` is the bit-level layout (the on-disk format spec), `quant_linear` the group-wise integer
linear layer, `formats` the registry the Hugging Face loader uses to build modules from a packed
checkpoint's quantization_config. Import it as `squeezeflow.kernels`.
"""
if __name__ == "kernels":
    # This folder was imported as a top-level `kernels`: the repository root is on sys.path (`python -m`
    # run from a checkout, or a Prefect worker running the flow from source), and it shadows Hugging
    # Face's `kernels` distribution, which transformers imports. Hand the name over to that package, so
    # both work; the design card fixes this folder's name, so it cannot simply be renamed.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:  # nothing else called `kernels` is installed: behave as if this folder were absent
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
