import pytest

from common import actions


def test_actions_register_with_their_defaults() -> None:
    specs = actions.load(["examples.actions"])
    assert specs["demo.crash"].max_attempts == 1
    assert (specs["demo.add"].max_attempts, specs["demo.add"].timeout_s) == (3, 3600)
    assert actions.lookup("demo.add") is specs["demo.add"]
    assert actions.lookup("no.such.action") is None


def test_a_name_cannot_be_taken_twice_or_be_empty() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        actions.action("demo.add")(lambda ctx: None)
    with pytest.raises(ValueError, match="1..200"):
        actions.action("")
    with pytest.raises(ValueError, match="positive"):
        actions.action("x.y", max_attempts=0)
    with pytest.raises(ValueError, match="positive"):
        actions.action("x.y", memory_limit_mb=0)


def test_a_checkpoint_must_say_something() -> None:
    ctx = actions.Context(execution_id="e", params={}, attempt=1)
    with pytest.raises(ValueError, match="cannot be None"):
        ctx.save_checkpoint(None)
