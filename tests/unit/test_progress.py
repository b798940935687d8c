"""Progress reporting (the pipeline hook, the run-wide percentage, the CLI bar) and the flows' parameter
form (choices offered as enums, free strings still accepted). No Prefect server needed."""
from __future__ import annotations

import io
import logging
import re
import sys
import warnings

import pytest
import torch

from squeezeflow import progress
from squeezeflow.progress import RunProgress, TerminalBar, terminal_bar


def test_run_progress_moves_inside_stages_and_never_backwards():
    sent: list[float] = []
    shown: list[tuple] = []
    with progress.display(lambda *a: shown.append(a)), \
            RunProgress([("calibrate", 1), ("compress r", 2), ("evaluate r", 1)], sent.append, min_interval=0) as run:
        run.stage("calibrate")
        progress.report("compress", 1, 4)          # not the current stage: ignored
        assert run.percent == 0
        run.stage("compress r")
        assert run.percent == 25
        for i in range(1, 5):
            progress.report("compress", i, 4)
        assert run.percent == 75
        progress.report("compress", 1, 4)          # a resumed stage reporting from its checkpoint
        assert run.percent == 75
        run.stage("evaluate r")
        progress.report("evaluate", 1, 2)
        assert run.percent == 87.5
        run.done()
    assert sent[0] == 0 and sent[-1] == 100 and sent == sorted(sent)
    assert ("compress r", 2, 4, 50.0) in shown and shown[-1][-1] == 100
    progress.report("compress", 1, 1)              # after exit nobody listens: a no-op


def test_sink_is_throttled_but_always_gets_start_and_end():
    sent: list[float] = []
    with RunProgress([("compress x", 1)], sent.append, min_interval=3600) as run:
        run.stage("compress x")
        for i in range(1, 101):
            progress.report("compress", i, 100)
        run.done()
    assert sent == [0.0, 100.0]


def test_broken_listeners_do_not_break_the_run():
    def boom(*_):
        raise RuntimeError("display gone")

    def bad_sink(_):
        raise ConnectionError("API down")

    with progress.display(boom), RunProgress([("compress x", 1)], bad_sink, min_interval=0) as run:
        run.stage("compress x")
        progress.report("compress", 1, 2)
        run.done()
    assert run.percent == 100


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _lines(raw: str) -> list[str]:
    """What a terminal shows, line by line: escapes dropped, each '\r'-redraw and newline a line."""
    return [ln for ln in re.split(r"[\r\n]", _ANSI.sub("", raw)) if ln.strip()]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_terminal_bar_shows_stage_and_run_eta_after_some_steps():
    out, clock = io.StringIO(), Clock()
    bar = TerminalBar(out, width=10, force_terminal=True, get_time=clock, console_width=100)
    bar("compress rtn", 0, 10, 0.0)
    assert not any(re.search(r"ETA \d+:\d\d:\d\d", ln) for ln in _lines(out.getvalue()))  # no rate yet
    for i in range(1, 4):  # one block per second
        clock.t = float(i)
        bar("compress rtn", i, 10, 5.0 * i)
    stage = [ln for ln in _lines(out.getvalue()) if ln.startswith("compress rtn")][-1]
    assert "3/10" in stage and "ETA 0:00:07" in stage  # 7 blocks left at 1 block/s
    run = [ln for ln in _lines(out.getvalue()) if ln.startswith("run")][-1]
    assert "15.0%" in run and "ETA 0:00:17" in run      # 85 % left at 5 %/s
    clock.t = 4.0
    bar("evaluate rtn", 1, 2, 90.0)                     # the finished stage leaves one line above
    assert any(ln.startswith("compress rtn") and "done 10/10 in 4.0 s" in ln for ln in _lines(out.getvalue()))
    bar("evaluate rtn", 2, 2, 100.0)                    # the run is over: the rows stop, nothing is left live
    assert bar._run is None and _ANSI.sub("", out.getvalue()).endswith("\n")
    bar.close()


def test_a_warning_or_log_line_mid_run_never_splits_a_bar_line(monkeypatch):
    # As in the CLI: the bar draws on stderr, and a library logger created earlier (as transformers' is)
    # holds that same stream; warnings are written to stderr too.
    out, clock = io.StringIO(), Clock()
    monkeypatch.setattr(sys, "stderr", out)
    lib_log = logging.getLogger("test_progress.library")
    handler = logging.StreamHandler(sys.stderr)
    lib_log.addHandler(handler)
    try:
        bar = TerminalBar(sys.stderr, width=10, force_terminal=True, get_time=clock, console_width=100)
        bar("compress rtn", 1, 4, 30.0)
        redirected = sys.stderr is not out  # rich's redirect, while the rows are live
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # Python's own display (pytest records warnings instead): formatted, written to sys.stderr.
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(m, c, f, n, line))
            warnings.warn("a library warning mid-run", UserWarning)
        lib_log.warning("a library log line mid-run")
        clock.t = 1.0
        bar("compress rtn", 2, 4, 40.0)
        bar.close()
    finally:
        lib_log.removeHandler(handler)
    assert redirected and sys.stderr is out and handler.stream is out  # all put back
    lines = _lines(out.getvalue())
    for needle in ("a library warning mid-run", "a library log line mid-run"):
        hits = [ln for ln in lines if needle in ln]
        assert hits, f"{needle!r} was not shown"
        assert all("compress rtn" not in ln and "ETA" not in ln and "━" not in ln for ln in hits), hits
    assert any(ln.startswith("compress rtn") and "2/4" in ln for ln in lines)


def test_terminal_bar_is_quiet_when_stderr_is_not_a_terminal():
    out = io.StringIO()  # isatty() is False
    with terminal_bar(out), RunProgress([("compress x", 1)]) as run:
        run.stage("compress x")
        run.done()
    assert out.getvalue() == ""
    with terminal_bar(out, enabled=True), RunProgress([("compress x", 1)]) as run:
        run.stage("compress x")
    assert "compress x" in out.getvalue()


def test_perplexity_reports_windows_scored():
    from squeezeflow.evaluation.perplexity import perplexity

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 11)})()

    seen = []
    perplexity(Uniform(), torch.randint(0, 11, (10, 8)), batch_size=4, on_windows=seen.append)
    assert seen == [4, 8, 10]


def test_cli_has_no_progress_flag_on_flow_commands():
    from squeezeflow.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["compress", "m", "--recipe", "rtn-w4g64", "--no-progress"]).no_progress
    assert not parser.parse_args(["sweep", "m", "--recipes", "rtn-w4g64"]).no_progress


# --- the parameter form ---------------------------------------------------------------------------

def _choices(prop: dict) -> tuple[list, dict]:
    enum_branch = next(b for b in prop["anyOf"] if "enum" in b)
    free_branch = next(b for b in prop["anyOf"] if "enum" not in b)
    return enum_branch["enum"], free_branch


def test_compress_form_offers_recipes_and_calibration_sources():
    from prefect.utilities.callables import parameter_schema

    from squeezeflow.calibration import SPLITS
    from squeezeflow.config import NAMED_SPLITS
    from squeezeflow.recipes import PRESET_EXAMPLES
    from squeezeflow.flows.compress import compress_flow

    assert set(NAMED_SPLITS) == set(SPLITS)
    schema = parameter_schema(compress_flow).model_dump()
    recipe = schema["properties"]["recipe"]
    presets, free = _choices(recipe)
    assert presets == list(PRESET_EXAMPLES) and free["type"] == "string"
    assert recipe["default"] == "rtn-w4g64" and "YAML" in recipe["description"]
    calib = schema["definitions"]["CalibrationSpec"]["properties"]
    sources, _ = _choices(calib["source"])
    assert sources == list(NAMED_SPLITS)
    assert calib["n_samples"]["minimum"] == 1 and calib["n_samples"]["maximum"] == 100_000
    assert all(calib[k].get("description") for k in ("source", "n_samples", "seqlen", "seed"))


@pytest.mark.parametrize("recipe", ["rtn-w4g64", "gptq-w3g64-act-static", "recipes/mine.yaml"])
def test_recipe_parameter_still_takes_any_string(recipe):
    from prefect.utilities.callables import get_call_parameters

    from squeezeflow.flows.compress import compress_flow
    from squeezeflow.flows.sweep import sweep_flow

    params = compress_flow.validate_parameters(get_call_parameters(compress_flow.fn, (), {"recipe": recipe}))
    assert params["recipe"] == recipe
    params = sweep_flow.validate_parameters({"recipes": [recipe, "rtn-w3g64"]})
    assert params["recipes"] == [recipe, "rtn-w3g64"]
