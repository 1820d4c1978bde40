"""Make the installed TensorRT type stubs (`tensorrt-stubs`) readable by mypy.

The stubs are generated from TensorRT's bindings and install `tensorrt/` and `tensorrt_bindings/`
with `.pyi` files but without the PEP 561 `py.typed` marker, so mypy would skip them; and a few
generated signatures are not valid Python (a parameter named `in`, a parameter without a default
after ones with defaults), which stops mypy before it checks anything. This marks the packages and
rewrites those signatures; running it again changes nothing. `make test` runs it after
installing the stubs.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")
FIXES = (
    # `in` is a keyword: pybind11 names a parameter after the C++ one.
    (re.compile(r"^(    def .*[(, ])in: ", re.MULTILINE), r"\1in_: "),
    # pybind11 allows a required argument after optional ones; Python does not.
    (
        re.compile(r", channel_axis: int\) -> IScaleLayer:"),
        ", channel_axis: int = ...) -> IScaleLayer:",
    ),
)


def fix(site: Path) -> list[Path]:
    """Mark and repair the stubs under `site`; the stub files that were rewritten."""
    changed = []
    for package in PACKAGES:
        folder = site / package
        if not (folder / "__init__.pyi").is_file():
            raise SystemExit(f"{folder}: no stubs there; pip install --no-deps tensorrt-stubs")
        (folder / "py.typed").touch()
        for stub in sorted(folder.glob("*.pyi")):
            text = stub.read_text()
            fixed = text
            for pattern, replacement in FIXES:
                fixed = pattern.sub(replacement, fixed)
            ast.parse(fixed, str(stub))  # any other invalid signature fails here, by name
            if fixed != text:
                stub.write_text(fixed)
                changed.append(stub)
    return changed


if __name__ == "__main__":
    for path in fix(Path(sysconfig.get_paths()["purelib"])):
        print(f"fixed {path}")
