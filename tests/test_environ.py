"""scoped_environ: settings for a library's start that must not leak into the rest of the process."""
import os

import pytest

from restem_ray.environ import scoped_environ


def test_values_hold_inside_the_block_and_what_was_there_comes_back_after_an_error(monkeypatch):
    monkeypatch.setenv("RESTEM_T_SET", "before")
    monkeypatch.delenv("RESTEM_T_UNSET", raising=False)
    with pytest.raises(RuntimeError):
        with scoped_environ({"RESTEM_T_SET": "inside", "RESTEM_T_UNSET": "inside"}):
            assert os.environ["RESTEM_T_SET"] == os.environ["RESTEM_T_UNSET"] == "inside"
            raise RuntimeError("the engine failed to start")
    assert os.environ["RESTEM_T_SET"] == "before" and "RESTEM_T_UNSET" not in os.environ
    with scoped_environ({}):  # nothing to set: nothing changes
        pass
    assert os.environ["RESTEM_T_SET"] == "before"
