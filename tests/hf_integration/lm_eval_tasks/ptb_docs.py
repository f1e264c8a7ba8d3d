"""Documents for the ``w4a8_ptb`` lm-eval task: the PTB test split (Mikolov) from the ``treebank`` package.

PTB is one sentence per line; consecutive ``lines_per_doc`` sentences make one document (~360 SmolLM2
tokens at 12), so each document fits one window of a 512-token model and lm-eval scores it in one pass.
"""

from __future__ import annotations


def ptb_documents(lines_per_doc: int) -> list[str]:
    from w4a8_dint.embedded import ptb_text

    if lines_per_doc < 1:
        raise ValueError(f"lines_per_doc must be >= 1, got {lines_per_doc}")
    lines = [ln.strip() for ln in ptb_text("test").split("\n") if ln.strip()]
    return [" ".join(lines[i:i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]


def load(lines_per_doc: int = 12, **_metadata) -> dict:
    """lm-eval ``custom_dataset``: it passes the task's metadata (version, ...) as keyword arguments."""
    import datasets

    docs = ptb_documents(int(lines_per_doc))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": docs})})

