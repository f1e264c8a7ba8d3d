"""Register the w4a8-dint quantizer with transformers without the user importing us.

transformers has no plugin entry point for quantizers, and on an unknown
``quant_method`` it only *warns* and then loads the model with random weights.
So the installed package ships ``w4a8_dint_hf.pth`` (see ``setup.py``), which
site.py runs at every interpreter start. It calls :func:`install`, which only
appends a finder to ``sys.meta_path`` (no torch, no transformers import: about
a tenth of a millisecond). The finder waits for ``transformers.quantizers.auto``;
right after that module finishes executing it imports
``w4a8_dint.hf_integration.quantizer``, which registers ``"w4a8-dint"``, and then
removes itself.

If that registration fails (a transformers version with a changed API, a broken
install), a stub config is registered instead whose constructor raises: loading
a w4a8-dint checkpoint then fails with the reason rather than giving garbage.

Opt out with ``W4A8_DINT_NO_AUTOREGISTER=1``. Nothing here may raise into the
interpreter's startup or into transformers' import.
"""

from __future__ import annotations

import os
import sys

TRIGGER = "transformers.quantizers.auto"
OPT_OUT_ENV = "W4A8_DINT_NO_AUTOREGISTER"
PTH_NAME = "w4a8_dint_hf.pth"


def _warn(msg: str) -> None:
    try:
        sys.stderr.write(f"w4a8-dint: {msg}\n")
    except Exception:
        pass


def register_now() -> bool:
    """Register the real quantizer, or a loud refusal if that fails; True on success. Never raises."""
    try:
        from w4a8_dint.hf_integration.quantizer import register

        register()
        return True
    except Exception as e:  # noqa: BLE001 - any failure must become a refusal, not a crash of transformers' import
        reason = f"{type(e).__name__}: {e}"
        _warn(f"could not register the transformers quantizer ({reason}); w4a8-dint checkpoints will refuse to load")
        try:
            _register_refusal(reason)
        except Exception as e2:  # noqa: BLE001
            _warn(f"could not register the refusal either ({type(e2).__name__}: {e2})")
        return False


def _register_refusal(reason: str) -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from w4a8_dint.config import QUANT_METHOD

    class W4A8DintUnavailableConfig(QuantizationConfigMixin):
        w4a8_dint_refusal = True

        def __init__(self, **kwargs):
            raise RuntimeError(
                "this checkpoint is quantized with w4a8-dint, but the w4a8-dint quantizer failed to register with "
                f"transformers ({reason}). Loading it without the quantizer would give random weights, so it is "
                "refused. Check `pip show w4a8-dint` and that the installed transformers is in its supported range."
            )

    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = W4A8DintUnavailableConfig


class _RunAfterExec:
    """Wraps the real loader for one module: execute it, put the real loader back, then call back."""

    def __init__(self, inner, callback) -> None:
        self._inner = inner
        self._callback = callback

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        module.__loader__ = self._inner
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._inner
        self._callback()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._inner, name)


class PostImportFinder:
    """One-shot meta-path finder: runs ``callback`` right after module ``target`` has executed.

    Duck-typed (no ``importlib.abc`` base): that import alone costs ~20 ms at every interpreter start.
    """

    def __init__(self, target: str, callback) -> None:
        self.target = target
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target:
            return None
        self.remove()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RunAfterExec(spec.loader, self.callback)
                return spec
        return None

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def _is_installed() -> bool:
    return any(isinstance(f, PostImportFinder) and f.target == TRIGGER for f in sys.meta_path)


def install() -> None:
    """Called from the .pth at interpreter start. Cheap, idempotent, never raises."""
    try:
        if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
            return
        if TRIGGER in sys.modules:  # transformers already imported (install() called late): register right away
            register_now()
            return
        if not _is_installed():
            # In front: the regular PathFinder would otherwise find transformers first and we'd never be asked.
            sys.meta_path.insert(0, PostImportFinder(TRIGGER, register_now))
    except Exception as e:  # noqa: BLE001
        _warn(f"import hook not installed ({type(e).__name__}: {e})")
