"""Running the ``rada-mma`` command in-process, as a user meets it: its output, or its one-line error."""

from __future__ import annotations

from rada_mma.cli import main


def run_ok(argv: list[str], capsys) -> str:
    """``rada-mma ARGV``, which must succeed; its standard output."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


def run_error(argv: list[str], capsys) -> str:
    """``rada-mma ARGV``, which must fail with exit status 2 and one line on standard error; that line."""
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2, f"exit status {code}; stderr: {err[-2000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"rada-mma {argv[0]}: error: "), err
    return lines[0]
