import pytest

from chatforge.cli import main
from chatforge.commands.guard import guard_command
from chatforge.errors import ChatforgeError


def test_unknown_action_and_missing_model_are_one_line_errors(capsys):
    with pytest.raises(ChatforgeError, match="guard: unknown action 'calibrat'; expected calibrate or train-moderation"):
        guard_command("calibrat")
    with pytest.raises(ChatforgeError, match=r"guard calibrate: name one MODEL \(a model folder or known name\)"):
        guard_command("calibrate")
    assert main(["guard", "calibrate"]) == 2
    assert "error: guard calibrate: name one MODEL" in capsys.readouterr().err
