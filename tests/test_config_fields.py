"""The shared vocabulary of config checks (training and pre-training configs both use it)."""

import math

import pytest

from safe_jax.config_fields import check_fields, check_writable, flatten, integer, number, string
from safe_jax.errors import SafeJaxError


@pytest.mark.parametrize("check,value,problem", [
    (integer(1), 0, "must be ≥ 1, got 0"),
    (integer(0, below=10), 10, "must be < 10, got 10"),
    (integer(8, multiple=8), 60, "must be a multiple of 8, got 60"),
    (integer(0), True, "must be an integer, got True"),
    (number(0, low_open=True), 0.0, "must be > 0, got 0"),
    (number(0, 1, high_open=True), 1.0, "must be < 1, got 1"),
    (number(), math.nan, "must be a finite number, got nan"),
    (number(optional=True), "x", "must be a number or None, got 'x'"),
    (string(nonempty=True), "", "must not be empty"),
])
def test_checks_say_what_is_wrong(check, value, problem):
    assert check(value) == problem


def test_good_values_pass():
    assert integer(0, below=10)(9) is None and number(0, 1)(1) is None and number(optional=True)(None) is None
    assert string(optional=True)(None) is None


def test_fields_are_named_unknown_missing_and_bad_in_one_line():
    spec = {"optim.lr": number(0, low_open=True), "steps": integer(1)}
    fields = flatten({"optim": {"lr": 1e-4}, "steps": 3})
    check_fields(fields, spec)
    with pytest.raises(SafeJaxError, match=r"^config.optim.lrr is not a config field \(did you mean config.optim.lr\?\)$"):
        check_fields({**fields, "optim.lrr": 1.0}, spec)
    with pytest.raises(SafeJaxError, match=r"^config.steps is missing \(see world.py\)$"):
        check_fields({"optim.lr": 1e-4}, spec, defaults="world.py")
    with pytest.raises(SafeJaxError, match="^config.steps must be ≥ 1, got 0$"):
        check_fields({**fields, "steps": 0}, spec)


def test_a_workdir_url_needs_a_filesystem_that_opens_it():
    with pytest.raises(SafeJaxError, match=r"^config.workdir: no filesystem opens nosuchfs://bucket/run \(nosuchfs:// is not"):
        check_writable("config.workdir", "nosuchfs://bucket/run")


def test_a_local_workdir_is_probed_with_a_real_write(tmp_path):
    check_writable("config.workdir", str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()  # probed, not created
    (tmp_path / "file").write_text("x")
    with pytest.raises(SafeJaxError, match="config.workdir: .*file exists and is not a directory"):
        check_writable("config.workdir", str(tmp_path / "file"))
