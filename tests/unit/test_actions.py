import pytest

from services.worker import registry


def test_actions_register_with_their_defaults() -> None:
    specs = registry.load(["examples.actions"])
    assert specs["demo.crash"].max_attempts == 1
    assert (specs["demo.add"].max_attempts, specs["demo.add"].timeout_s) == (3, 3600)
    assert registry.lookup("demo.add") is specs["demo.add"].fn
    assert registry.lookup("no.such.action") is None


def test_a_name_cannot_be_taken_twice_or_be_empty() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        registry.action("demo.add")(lambda ctx: None)
    with pytest.raises(ValueError, match="1..200"):
        registry.action("")
    with pytest.raises(ValueError, match="positive"):
        registry.action("x.y", max_attempts=0)
