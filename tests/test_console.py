"""logging.console=ours: an actor's output, and that of the processes it starts, lands in its log file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from harmony_mcore.console import actor_log


def test_redirected_output_goes_to_the_actor_log_not_the_terminal(tmp_path):
    log = actor_log(str(tmp_path), "engine-0")
    code = textwrap.dedent(f"""
        import subprocess, sys, warnings
        from harmony_mcore.console import redirect_output
        print("before")
        sys.stdout.flush()
        redirect_output({log!r})
        print("from python")
        warnings.warn("a library deprecation")
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'from a child process\\\\n')"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "before\n" and proc.stderr == "", "nothing after the redirect reaches the terminal"
    text = open(log).read()
    assert "from python" in text and "a library deprecation" in text and "from a child process" in text
