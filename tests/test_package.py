"""The package's surface: a cheap import and lazily resolved public names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import s3cache


def test_import_loads_no_heavy_dependency() -> None:
    code = ("import sys, s3cache; heavy = {'keras', 'tensorflow', 's3fs', 'boto3', 'diskcache', 'numpy', 'PIL'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_resolve() -> None:
    for name in s3cache.__all__:
        assert getattr(s3cache, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        s3cache.no_such_name  # noqa: B018
