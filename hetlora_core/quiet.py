"""The libraries' console noise off: one function shared by the CLI and the bench's worker processes
(a spawned worker starts with fresh warning filters, so the parent's do not reach it)."""

from __future__ import annotations


def quiet_libraries(verbose: bool) -> None:
    """The console shows this tool's progress, not the libraries': no FutureWarning/DeprecationWarning
    noise and no transformers "Loading weights" bars, unless ``-v`` asks for everything."""
    if verbose:
        return
    import warnings

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
