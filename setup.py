"""Build script for rlora_kernels: the Python package and, with a compiler, rlora_kernels._C.

Sources and flags come from csrc/build_config.json, which CMakeLists.txt reads too.
Environment: RLORA_NO_BUILD=1 skips the extension; RLORA_REQUIRE_BUILD=1 turns a failed
build into an error (CI); RLORA_NO_CUDA=1 builds the CPU kernels only;
TORCH_CUDA_ARCH_LIST picks the GPU targets (default from the config, "8.0;9.0").
"""

import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CONFIG = json.loads((ROOT / "csrc" / "build_config.json").read_text())


# Commands that compile; metadata-only runs (egg_info, dist_info, --name) stay quiet, so a
# pip install, which runs setup.py several times, says what happened to the extension once.
_BUILDING = any(cmd in sys.argv for cmd in ("build", "build_ext", "bdist_wheel", "install",
                                             "develop", "editable_wheel"))


def _say(msg: str) -> None:
    # The build tool prints; the library itself only logs.
    if _BUILDING:
        print(f"rlora_kernels setup: {msg}", file=sys.stderr)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _rel(paths):
    # setuptools wants paths relative to setup.py.
    return [str(Path(p)) for p in paths]


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "c++").split()[0]
    return shutil.which(cxx) is not None


def _extensions():
    """(ext_modules, cmdclass) for rlora_kernels._C, or ([], {}) with one message why not."""
    if _flag("RLORA_NO_BUILD"):
        _say("RLORA_NO_BUILD is set; installing pure Python (no rlora_kernels._C)")
        return [], {}
    if not _have_cxx():
        _say("no C++ compiler found; installing pure Python (no rlora_kernels._C)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        _say(f"torch is not importable at build time ({exc}); installing pure Python. "
             "Build with `pip install --no-build-isolation` to get rlora_kernels._C")
        return [], {}

    linux = sys.platform.startswith("linux")
    sources = _rel(CONFIG["common_sources"] + CONFIG["cpu_sources"])
    cxx = list(CONFIG["cxx_flags"]) + (CONFIG["cxx_flags_linux"] if linux else [])
    link = list(CONFIG["link_flags_linux"]) if linux else []
    include = [str(ROOT / d) for d in CONFIG["include_dirs"]]

    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _flag("RLORA_NO_CUDA"))
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CONFIG["default_cuda_arch_list"])
        _say(f"building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST="
             f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
        define = [(CONFIG["cuda_define"], "1")]
        ext = cpp_extension.CUDAExtension(
            CONFIG["extension"],
            sources + _rel(CONFIG["cuda_binding_sources"] + CONFIG["cuda_sources"]),
            include_dirs=include, define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": list(CONFIG["nvcc_flags"])},
            extra_link_args=link)
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit"
        _say(f"building the CPU kernels only ({why})")
        ext = cpp_extension.CppExtension(
            CONFIG["extension"], sources, include_dirs=include,
            extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed compile leaves a working pure-Python install unless it was required."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler errors surface as several types
                if _flag("RLORA_REQUIRE_BUILD"):
                    raise
                _say(f"building rlora_kernels._C failed ({exc}); installing pure Python")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="rlora_kernels",
    version="0.1.0",
    description="Kernels and optimizers for Riemannian LoRA on the fixed-rank manifold",
    packages=find_packages(include=["rlora_kernels", "rlora_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.8"],
        "peft": ["peft"],
        "finetune": ["transformers", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "peft", "transformers", "matplotlib"],
    },
    entry_points={"console_scripts": ["rlora=rlora_kernels.cli.main:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
