"""One place for the checkpoint rules: a grep over the installed packages' source.

What the grep allows, precisely (everything else in w4a8_dint/, calibrate/, hf_integration/,
vllm_w4a8/, hw_model/, kernels/ fails this test):

* ``safe_open`` / ``get_slice`` / ``struct.unpack`` of the 8-byte header length (opening safetensors
  files, reading headers): only ``w4a8_dint/contract.py``, plus ``calibrate/stream.py``'s
  ``LazyTensors``, which reads tensor *data* back from the spill files the calibrator itself wrote
  a minute earlier (not a checkpoint, nothing to validate). Checkpoint and source-model tensors are
  loaded through the contract's reader (``contract.read_tensors``, or its old names
  ``checkpoint.load_tensors`` / ``shard_files``). The HF and vLLM loaders read weight data through
  their frameworks' own loaders, after the contract has checked the directory.
* parsing the safetensors index (``"weight_map"``): only the contract; ``checkpoint.py`` may *write* it.
* reading ``config.json`` with ``json``: only the contract (``read_hf_config`` /
  ``read_checkpoint_config``); others may test that the file exists.
* the old per-integration validators and header readers (``read_headers`` outside the contract,
  ``_read_layer_tensors``, ``load_small_tensors``, ``check_checkpoint_against_model``,
  ``_check_float_tensors``, ``_FLOAT_ONLY_MODULES``, a private safetensors dtype table): nowhere but
  the contract. ``checkpoint.check_layer_tensors`` and ``vllm_w4a8.validation.validate_for_serving``
  remain as names importers use, and must delegate to the contract (checked below).
* rule text: the messages that state a rule ("must stay float", "belongs to per-tensor", "above the
  bound", ...) are spelled only in the contract, so no module restates a rule with its own wording.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("w4a8_dint", "calibrate", "hf_integration", "vllm_w4a8", "hw_model", "kernels")
CONTRACT = "w4a8_dint/contract.py"

# pattern -> files (besides the contract) allowed to contain it
RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "opens safetensors files": (r"\bsafe_open\b", ("calibrate/stream.py",)),
    "reads safetensors headers": (r"\.get_slice\(|struct\.unpack\(\s*['\"]<Q", ()),
    "parses the safetensors index": (r"\[\s*['\"]weight_map['\"]\s*\]|\.get\(\s*['\"]weight_map['\"]", ()),
    "reads config.json itself": (r"json\.loads?\([^)\n]*config\.json|config\.json['\"]\s*\)\s*\.read_text", ()),
    "defines an old validator / reader": (
        r"def (read_headers|_read_layer_tensors|load_small_tensors|check_checkpoint_against_model|_check_float_tensors)\b"
        r"|_FLOAT_ONLY_MODULES|_SAFETENSORS_DTYPES", ()),
    "restates a rule's wording": (
        r"must stay float(?!32)|belongs to per-tensor|above the bound|non-finite or negative|per-tensor layer needs"
        r"|needs both qweight", ()),
}


def _sources() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            out[str(p.relative_to(REPO))] = p.read_text(encoding="utf-8")
    return out


@pytest.mark.parametrize("what", sorted(RULES))
def test_only_the_contract(what):
    pattern, allowed = RULES[what]
    offenders = [
        f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for path, text in _sources().items() if path != CONTRACT and path not in allowed
        for m in re.finditer(pattern, text)
    ]
    assert not offenders, f"{what} outside {CONTRACT}: {offenders}"


def test_the_contract_itself_matches_the_patterns():
    """The grep is not vacuous: the contract does every one of these things."""
    text = (REPO / CONTRACT).read_text(encoding="utf-8")
    for what, (pattern, _) in RULES.items():
        if what not in ("defines an old validator / reader", "reads config.json itself"):
            assert re.search(pattern, text), what
    assert 'CONFIG_FILE = "config.json"' in text and "json.loads(path.read_text(" in text


def test_kept_names_delegate_to_the_contract():
    from w4a8_dint import checkpoint, contract
    from w4a8_dint.hf_integration import quantizer

    assert checkpoint.CheckpointError is contract.CheckpointError
    assert quantizer.check is contract.check and quantizer.structure_from_model is contract.structure_from_model
    validation = (REPO / "vllm_w4a8" / "validation.py").read_text()
    assert "from w4a8_dint.contract import" in validation and re.search(r"\bcheck\(Checkpoint\(", validation)
    shim = (REPO / "w4a8_dint" / "checkpoint.py").read_text()
    body = shim[shim.index("def check_layer_tensors"):]
    assert "check_loaded_tensor(" in body and "RULES_BY_SUFFIX" in body
    method = (REPO / "vllm_w4a8" / "method.py").read_text()
    loaded = method[method.index("def check_loaded_tensor"):method.index("def _require_all_loaded")]
    assert "contract.check_loaded_tensor(" in loaded and "torch.isfinite" not in loaded
