"""Tests that run twice, on a native kernel and on the torch ops it replaces."""

import pytest


def native_and_torch(*ops: str):
    """An autouse fixture that runs every test of a module twice: with the native kernels `ops`
    (`alignloop.kernels`; skipped where they cannot build) and with torch ops doing the same work.
    The test may take it as an argument to know which ("native" or "torch")."""

    @pytest.fixture(autouse=True, params=["native", "torch"])
    def path(request, monkeypatch):
        from alignloop.kernels import native

        for op in ops:
            if request.param == "torch":
                monkeypatch.setattr(native, op, lambda: None)
            elif getattr(native, op)() is None:
                pytest.skip(f"no native kernels here: {native.why_not() or 'the build failed'}")
        return request.param

    return path
