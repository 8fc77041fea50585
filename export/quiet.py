"""Quiet frameworks for the command-line entry points that load models (the export, the demo)."""

from __future__ import annotations

import logging
import warnings


def quiet_frameworks() -> None:
    """For this run only (an entry point's choice, never a library's: the export and the demo call it
    unless --verbose): the frameworks' warnings below ERROR and their weight-loading progress bars off.
    What they say on an export that works: torch.onnx that torchvision is absent and that dynamic axes
    share constraints, onnxscript's constant folding that it cannot fold an empty reshape (the graph
    keeps the node), copyreg's pytree deprecation. Errors still show; so do download progress bars (a
    9B checkpoint takes a while to fetch)."""
    # heavy: imported only by an entry point on its way to loading models
    import huggingface_hub.utils
    import torch  # noqa: F401 - imported first: its logging set-up would reset the level set below
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()  # transformers turned the download bars off with its own
