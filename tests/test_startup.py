"""A launch a person can watch (issue 24): weight-loading progress per rank group, and a rank
that is not up within timeouts.startup_s named in one line with a non-zero exit."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mmhpc.models import loader, load_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_loading_progress_counts_every_byte(tiny_llava, capsys, monkeypatch):
    monkeypatch.setattr(loader, "PROGRESS_EVERY_S", 0.0)        # a line per tensor
    before = loader.bytes_read
    with loader.reporting("prefill rank 2 on n0 (tp 1)"):
        load_model(tiny_llava)
    read = loader.bytes_read - before
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mmhpc: ")]
    assert lines[0].startswith("mmhpc: prefill rank 2 on n0 (tp 1): loading weights, ")
    assert lines[-1].startswith(f"mmhpc: prefill rank 2 on n0 (tp 1): weights loaded, "
                                f"{read / 1e6:.1f} MB in ")
    steps = [ln for ln in lines if " of " in ln]
    assert len(steps) > 10 and steps[-1].endswith("(100%)"), steps[-3:]
    load_model(tiny_llava)                                      # outside: silent
    assert "mmhpc:" not in capsys.readouterr().err


def test_rank_not_up_within_startup_s_is_named(tmp_path):
    # The frontend-only rank 0 is set up at once; the workers load a model (seconds).
    r = subprocess.run([str(BIN / "mpiexec"), "-n", "4", sys.executable, "-m", "mmhpc",
                        "deployment=e_p_d", "model=tiny_llava", "server.port=0",
                        "timeouts.startup_s=1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mmhpc: error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "not up after 1 s (timeouts.startup_s)" in errors[0], errors
    assert "(decode on " in errors[0] or "(prefill on " in errors[0] or "(encode on " in errors[0]
    assert "mmhpc ready" not in r.stdout
