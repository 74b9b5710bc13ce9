"""Shared CLI test helpers: run ``chatterbox-rt`` in-process, and check a user error's shape."""
from chatterbox_rt.cli import main


def run(argv, capsys):
    """``chatterbox-rt ARGV`` in this process -> ``(exit status, stdout, stderr)``."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, match):
    """Exit status 2 and exactly one ``chatterbox-rt: error: ...`` line, last, containing ``match``;
    no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert errors[0].startswith("chatterbox-rt: error: ") and match in errors[0], err
