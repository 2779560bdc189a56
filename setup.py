"""The package list, found rather than written out: qlora/ as `qlora`, kernels/ as `qlora.kernels` and
recipes/ as `qlora.recipes` (setuptools' own find cannot rename folders, so it runs once per folder).
Everything else about the build is in pyproject.toml."""
from setuptools import find_packages, setup

FOLDERS = {"qlora": "qlora", "qlora.kernels": "kernels", "qlora.recipes": "recipes"}
PACKAGES = sorted({f"{package}.{sub}" for package, folder in FOLDERS.items() for sub in find_packages(folder)}
                  | set(FOLDERS))

setup(package_dir=FOLDERS, packages=PACKAGES)
