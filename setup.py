"""sglang-ext: barrier-aware data-parallel load balancing for SGLang.

`triton_kernels/` and `patches/` live at the top of the repository but install
under the `sglang_ext` namespace (`sglang_ext.triton_kernels`,
`sglang_ext.patches`): `triton_kernels` is already the import name of a package
SGLang imports, and `patches` is too generic to claim.
"""
from setuptools import setup

setup(
    name="sglang-ext",
    version="0.1.0",
    description="Barrier-aware DP-attention load balancing for SGLang (BF-IO placement, "
    "Triton cost projection, per-step idle/energy telemetry)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "sglang_ext",
        "sglang_ext.policies",
        "sglang_ext.sim",
        "sglang_ext.plugin",
        "sglang_ext.triton_kernels",
        "sglang_ext.patches",
    ],
    package_dir={
        "sglang_ext": "sglang_ext",
        "sglang_ext.triton_kernels": "triton_kernels",
        "sglang_ext.patches": "patches",
    },
    install_requires=["numpy", "scipy", "matplotlib", "tqdm", "triton", "pyzmq>=25.1.2"],
    extras_require={"nvml": ["nvidia-ml-py"], "test": ["pytest", "pytest-timeout"]},
    entry_points={
        "console_scripts": ["sglang-ext=sglang_ext.cli:main"],
        "sglang.srt.plugins": ["sglang_ext=sglang_ext.plugin:load"],
    },
)
