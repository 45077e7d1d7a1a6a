"""Fused, chunked reductions: each op with a reference, a torch and a Triton implementation."""

if __name__ == "kernels":
    # This folder is `tokenprobe.kernels`. Imported as a top-level `kernels`, with the clone's root
    # on sys.path (`python -m pytest`, a shell or notebook started there), it shadows Hugging
    # Face's `kernels` package, which transformers >= 5.25 requires and imports. So this module
    # hands over to that package: the first one on sys.path outside the clone's root.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (this folder is tokenprobe's own "
                                  "kernels, imported as tokenprobe.kernels)", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
