"""The real Prefect UI, driven in headless Chromium: a person's path from the deployment to the artifacts.

The session's Prefect server serves the UI (the default V2 UI, under /v2). The test opens the `compress`
deployment, starts a custom run through its parameter form (picks a recipe from the preset dropdown, types
a calibration size), lets a real process worker run it on the tiny model, then opens the finished run and
its Artifacts tab. Screenshots of every step go to reports/ui/ for a person to look at.

Browser: Debian's /usr/bin/chromium through Playwright's Python API (`executable_path`, so Playwright never
downloads a browser). Skipped, saying so, only when no chromium executable is found.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest

from prefect_fixtures import (  # noqa: F401  (fixtures are used by name)
    ProcessWorker,
    stop_worker_and_runs,
    prefect_server,
    shared_inputs,
    tiny_llama,
    wait_for,
    worker_env,
)

# Nothing here may assume an idle machine: every wait is for something the UI or the server does, with
# limits of minutes (a loaded 2-core machine took over 30 s just to create the run).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
UI_WAIT_S = 300           # a page, a form submission, the worker picking up the pool
RUN_WAIT_S = 900          # the flow run itself, on the tiny model
TERMINAL_ICON = re.compile(r"/(completed|failed|crashed|cancelled)\.svg$")

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "reports" / "ui"
RECIPE = "rtn-w3g64"      # picked in the form; the deployment's default is rtn-w4g64
CALIB_SAMPLES = 3         # typed in the form; the deployment's default is 4


def chromium_path() -> str | None:
    for candidate in (os.environ.get("SQUEEZEFLOW_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def shot(page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_custom_run_from_the_ui_form_completes_and_shows_its_artifacts(
        s3_server, shared_inputs, prefect_server, tiny_llama, tmp_path):
    browser_exe = chromium_path()
    if browser_exe is None:
        pytest.skip("no chromium executable (apt-get install chromium, or set SQUEEZEFLOW_CHROMIUM)")
    from playwright.sync_api import expect, sync_playwright

    from squeezeflow.recipes import PRESET_EXAMPLES
    from squeezeflow.flows.deployments import COMPRESS, deploy

    api = prefect_server["url"]
    ui = api.removesuffix("/api") + "/v2"
    assert httpx.get(api.removesuffix("/api") + "/ui-settings", timeout=30).json()["api_url"] == api, \
        "the UI would call another API than this server's"
    tag = uuid.uuid4().hex[:8]
    pool = f"ui-{tag}"
    registry_uri = f"s3://{s3_server['bucket']}/test-ui-{tag}"
    # Defaults of the form: the tiny model, small windows, this test's store and registry.
    defaults = {"model": {"ref": str(tiny_llama)}, "recipe": "rtn-w4g64",
                "calibration": {"source": "sotu-calib", "n_samples": 4, "seqlen": 64},
                "evaluation": {"seqlen": 64, "max_windows": 2},
                "destinations": {"store": str(tmp_path / "store"), "registry": registry_uri}}
    deployment_id = deploy(COMPRESS, pool=pool, parameters=defaults)
    SHOTS.mkdir(parents=True, exist_ok=True)
    worker = ProcessWorker(pool, tmp_path / "worker.log", cwd=tmp_path, env=worker_env())
    run_id = None
    try:
        # The deployment turns READY once the worker polls its pool: the page then shows a live deployment.
        wait_for(lambda: httpx.get(f"{api}/deployments/{deployment_id}", timeout=30).json()["status"] == "READY",
                 timeout=UI_WAIT_S, interval=1.0, what="the worker to poll the deployment's pool")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_exe, headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, color_scheme="light")
            page.set_default_timeout(UI_WAIT_S * 1000)
            page.set_default_navigation_timeout(UI_WAIT_S * 1000)
            # expect() waits 5 s by default; on 2 busy cores the run page (graph, logs) can take far longer.
            expect.set_options(timeout=UI_WAIT_S * 1000)

            # 1. The deployment's page.
            page.goto(f"{ui}/deployments/deployment/{deployment_id}", wait_until="networkidle")
            expect(page.get_by_text("compress").first).to_be_visible()
            shot(page, "01-deployment")

            # 2. Custom run: the recipe from the preset dropdown, the calibration size typed in.
            page.goto(f"{ui}/deployments/deployment/{deployment_id}/run", wait_until="networkidle")
            preset = page.get_by_role("button", name="Select Preset")
            expect(preset).to_have_text("rtn-w4g64")
            expect(page.get_by_role("button", name="Select Named split")).to_have_text("sotu-calib")
            preset.click()
            options = page.get_by_role("option")
            expect(options).to_have_count(len(PRESET_EXAMPLES))
            shot(page, "02-recipe-dropdown")
            page.get_by_role("option", name=RECIPE, exact=True).click()
            expect(preset).to_have_text(RECIPE)
            n_samples = page.get_by_label("N Samples (Optional)")
            assert (n_samples.get_attribute("min"), n_samples.get_attribute("max")) == ("1", "100000")
            n_samples.fill(str(CALIB_SAMPLES))
            expect(preset).to_have_text(RECIPE)
            expect(n_samples).to_have_value(str(CALIB_SAMPLES))
            shot(page, "03-run-form-filled")
            # 3. Submit. The run this form creates is the one in the UI's own create_flow_run response (other
            # tests in this session deploy `compress/compress` on the same server and leave their runs);
            # on a loaded machine the answer can take long, so the wait is for that event, not a guess.
            with page.expect_response(
                    lambda r: r.request.method == "POST"
                    and r.url.endswith(f"/deployments/{deployment_id}/create_flow_run"),
                    timeout=UI_WAIT_S * 1000) as created:
                page.get_by_role("button", name="Submit").click()
            assert created.value.ok, (created.value.status, created.value.text())
            run = created.value.json()
            run_id = run["id"]
            assert run["parameters"]["recipe"] == RECIPE, run["parameters"]
            assert run["parameters"]["calibration"]["n_samples"] == CALIB_SAMPLES, run["parameters"]
            # The form then returns to the deployment's page, whose Runs tab lists the new run.
            page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment_id}([?#].*)?$"))
            expect(page.get_by_text(run["name"]).filter(visible=True).first).to_be_visible()

            # 4. The worker runs it; the run's page shows its state as it goes (it refetches every 5 s
            # until the run ends, and sets the tab icon to /<state>.svg).
            t0 = time.monotonic()
            page.goto(f"{ui}/runs/flow-run/{run_id}", wait_until="domcontentloaded")
            state_icon = page.locator("link#favicon-16")  # the light scheme's icon: the page is light
            while True:
                try:
                    expect(state_icon).to_have_attribute("href", TERMINAL_ICON, timeout=30_000)
                    break
                except AssertionError:
                    assert worker.alive(), f"worker exited:\n{worker.log()[-4000:]}"
                    if time.monotonic() - t0 > RUN_WAIT_S:
                        raise
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=60).json()["state"]
            assert state["type"] == "COMPLETED", f"{state}\n{worker.log()[-8000:]}"
            print(f"\n[ui] flow run {run_id} completed {time.monotonic() - t0:.1f} s after submit")

            # 5. The finished run, then its Artifacts tab.
            page.goto(f"{ui}/runs/flow-run/{run_id}", wait_until="networkidle")
            expect(page.get_by_text("Completed", exact=True).filter(visible=True).first).to_be_visible()
            expect(page.get_by_text(run["name"]).filter(visible=True).first).to_be_visible()
            shot(page, "04-flow-run-completed")
            page.get_by_role("tab", name="Artifacts").click()
            for key in (f"compress-{RECIPE}", f"compress-progress-{RECIPE}"):
                expect(page.get_by_text(key).filter(visible=True).first).to_be_visible()
            shot(page, "05-flow-run-artifacts")
            # The V2 UI shows a progress artifact's card but not its value: read that from the API.
            progress = httpx.post(f"{api}/artifacts/filter", timeout=30, json={"artifacts": {
                "flow_run_id": {"any_": [run_id]}, "type": {"any_": ["progress"]}}}).json()
            assert [a["data"] for a in progress] == [100], progress
            browser.close()
    except BaseException:
        print(f"\n[ui] ---- worker log ----\n{worker.log()[-20000:]}")
        raise
    finally:
        stop_worker_and_runs(worker, [run_id])
