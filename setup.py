"""Build hook: ship ``w4a8_dint_hf.pth`` at the site-packages root (all metadata is in pyproject.toml).

The .pth lets a plain ``AutoModelForCausalLM.from_pretrained(dir)`` load a
w4a8-dint checkpoint without importing this package first: at interpreter
start it installs a tiny import hook that registers the quantizer once
transformers is imported (hf_integration/autoregister.py; docs/hf_integration.md).

* regular wheel (``pip install .``): the file is added to build_lib, so it lands
  next to the packages in site-packages;
* editable (``pip install -e .``, PEP 660): setuptools builds the editable wheel
  from its install dir, not build_lib, so the file is written there instead.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "w4a8_dint_hf.pth"
# One line, run by site.py: must never fail loudly (a stale .pth after a broken
# uninstall is silently ignored) and must stay cheap (no torch/transformers import).
PTH_LINE = (
    'import sys; exec("try:\\n from w4a8_dint.hf_integration import autoregister\\n'
    'except ImportError:\\n pass\\nelse:\\n autoregister.install()")\n'
)


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target_dir = Path(self.get_finalized_command("install").install_lib)
        else:
            target_dir = Path(self.build_lib)
        target_dir.mkdir(parents=True, exist_ok=True)
        (target_dir / PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib) / PTH_NAME))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
