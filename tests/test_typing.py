"""The package stays strictly typed (mypy --strict, configured in pyproject.toml), and what it
writes out by hand for speed says what its declarations say."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

from adapter import case, decision, pipeline, rules

from .conftest import ROOT


def test_adapter_passes_mypy_strict() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


_WRITTEN_OUT = [
    cls
    for module in (case, decision, pipeline, rules)
    for cls in vars(module).values()
    if dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__ and not cls.__dataclass_params__.init
]
assert len(_WRITTEN_OUT) == 11, "Case, Session, ClaimLine, Service, Diagnosis, Performer, Finding, Line, Decision, Plan, AnnotatedClaim"


@pytest.mark.parametrize("cls", _WRITTEN_OUT, ids=lambda cls: cls.__qualname__)
def test_a_written_out_init_takes_the_fields_in_order_with_their_defaults(cls: type) -> None:
    # The values a replay makes by the hundred thousand have their __init__ written out (see
    # case.py): a field added to the class and not to its __init__ would be left unset.
    fields = [f for f in dataclasses.fields(cls) if f.init]
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    for field, param in zip(fields, params):
        if field.default is not dataclasses.MISSING:
            assert param.default == field.default, field.name
        elif field.default_factory is not dataclasses.MISSING:
            assert param.default is None, field.name
        else:
            assert param.default is inspect.Parameter.empty, field.name
    made = cls(*[object() for p in params if p.default is inspect.Parameter.empty])
    for field in fields:
        if field.default is not dataclasses.MISSING:
            assert getattr(made, field.name) == field.default, field.name
        elif field.default_factory is not dataclasses.MISSING:
            assert getattr(made, field.name) == field.default_factory(), field.name
