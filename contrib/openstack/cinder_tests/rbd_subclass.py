"""Cinder's own RBD driver unit tests, run against RBDRestoreDriver.

    python -m cinder_tests.rbd_subclass [test modules ...]

The tests build their driver with ``driver.RBDDriver(...)``. From here on that
call makes an RBDRestoreDriver (through ``__new__``), so every test of RBDDriver's
behaviour checks that the subclass still behaves as an RBDDriver. The class keeps
its name: RBDDriver calls ``super(RBDDriver, self)``, which a renamed class would
send round in circles. Cinder runs these tests with testtools, not pytest.
"""

from __future__ import annotations

import sys
from typing import Any

from cinder.volume.drivers import rbd as rbd_module
from rbd_restore_cinder.volume import RBDRestoreDriver

TESTS = "cinder.tests.unit.volume.drivers.test_rbd"


def _new(cls: type[Any], *args: Any, **kwargs: Any) -> Any:
    return object.__new__(RBDRestoreDriver if cls is rbd_module.RBDDriver else cls)


def main(argv: list[str]) -> None:
    from testtools import run

    rbd_module.RBDDriver.__new__ = _new
    made = rbd_module.RBDDriver.__new__(rbd_module.RBDDriver)
    assert isinstance(made, RBDRestoreDriver), "the swap did not take"
    run.main(["rbd_subclass", *(argv or [TESTS])], sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
