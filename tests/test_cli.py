"""The command line's own usage errors look like every other error: one `error:` line on stderr, exit status 2."""

from __future__ import annotations

import pytest

from analytic_diffusion.cli import main


@pytest.mark.parametrize(("argv", "message"), [
    ([], "the following arguments are required: command (see 'ads --help')"),
    (["memorization"], "the following arguments are required: images (see 'ads memorization --help')"),
    (["cache", "clear", "--older-than", "-5d"], "argument --older-than: expected one argument"),
    (["generat"], "invalid choice: 'generat'"),
])
def test_usage_errors_are_one_line_with_status_2(capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
