"""unimlip: Uni-Mlip medical vision-language pre-training (Bawazir, Wu, Li, BMVC 2024, arXiv 2411.15207)."""
from pathlib import Path

from setuptools import find_packages, setup


def _pinned(name: str) -> list:
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-r"))]


setup(
    name="unimlip",
    version="0.1.0",
    description="Distributed Uni-Mlip medical vision-language pre-training on WebDataset shards with DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unimlip_train*", "data_prep*", "launch*"]),
    package_data={"unimlip_train": ["resources/*", "resources/*/*"], "launch": ["*.sh", "examples/*"]},
    include_package_data=True,
    install_requires=_pinned("requirements.txt"),
    extras_require={"test": _pinned("requirements-test.txt")},
    entry_points={
        "console_scripts": [
            "unimlip-shard=unimlip_train.cli.shard:main",
            "unimlip-train=unimlip_train.cli.train:main",
            "unimlip-demo=unimlip_train.cli.demo:main",
            "unimlip-export=unimlip_train.cli.export:main",
            "unimlip-checkpoint=unimlip_train.cli.checkpoint:main",
            "unimlip-eval=unimlip_train.cli.eval:main",
            "unimlip-finetune=unimlip_train.cli.finetune:main",
            "unimlip-fetch-weights=unimlip_train.cli.fetch_weights:main",
            "unimlip-submit=unimlip_train.cli.submit:main",
            "unimlip-ablate=unimlip_train.cli.ablate:main",
        ]
    },
)
