"""Notebook 05 in JupyterLab, in a real headless Chromium (Debian's) driven by playwright: Run All, then a
question typed in the box and Enter pressed, as a user does.

JupyterLab is started the way a user starts it, `./run_all.sh lab --no-browser --port N`, on a folder
holding a copy of notebook 05 and a trained tiny run (`outputs/runs/tiny` with `final/`, what notebooks
01-04 make). `./run_all.sh test` runs this test after the notebooks ran under nbval and points
COZYRAG_BROWSER_WORKDIR at their folder; run on its own, it first runs notebooks 01-04 on the tiny
preset with papermill (minutes). The kernel gets no COZYRAG_PRESET: the notebook finds the tiny run as
the most recent run. The copy evaluates 8 test questions per row (max_eval_qa) to stay quick.

Skipped, saying why, without playwright (`pip install playwright`; its own browser download is not used)
or without Chromium (`apt-get install chromium`; COZYRAG_CHROMIUM names another binary).
Screenshots: outputs/browser/05_question_box.png and 05_plots.png (git-ignored).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT
from test_explore import executed_box_notebook

pytestmark = pytest.mark.browser

NOTEBOOK = "browser_05_explore_answers.ipynb"
QUESTION = "What is the capital of France?"
SHOTS = ROOT / "outputs" / "browser"


def chromium() -> str | None:
    found = os.environ.get("COZYRAG_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return found if found and Path(found).exists() else None


@pytest.fixture(scope="module")
def browser_path() -> str:
    pytest.importorskip("playwright", reason="playwright is not installed (pip install playwright)")
    path = chromium()
    if path is None:
        pytest.skip("no Chromium found: `apt-get install chromium` (or set COZYRAG_CHROMIUM to a Chromium binary)")
    return path


def _tiny_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "COZYRAG_PRESET"}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def workdir(browser_path, tmp_path_factory) -> Path:
    """A folder with a trained tiny run under outputs/runs/ and a fresh copy of notebook 05."""
    given = os.environ.get("COZYRAG_BROWSER_WORKDIR")
    work = Path(given) if given else tmp_path_factory.mktemp("browser")
    if not (work / "outputs" / "runs" / "tiny" / "final").is_dir():
        if given:
            pytest.fail(f"COZYRAG_BROWSER_WORKDIR={given} holds no trained tiny run (outputs/runs/tiny/final)")
        for nb in sorted((ROOT / "notebooks").glob("0[1-4]_*.ipynb")):  # what a user runs before notebook 05
            r = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(work / f"out_{nb.name}"), "-k", "python3",
                                "-p", "preset", "tiny", "--cwd", str(work)], env=_tiny_env(), capture_output=True, text=True)
            assert r.returncode == 0, f"{nb.name} failed:\n{r.stderr[-3000:]}"
    nb = nbformat.read(ROOT / "notebooks" / "05_explore_answers.ipynb", as_version=4)
    params = nb.cells[1]
    assert "max_eval_qa = None" in params.source
    params.source = params.source.replace("max_eval_qa = None", "max_eval_qa = 8", 1)
    nbformat.write(nb, work / NOTEBOOK)
    return work


@pytest.fixture(scope="module")
def lab(workdir):
    """`./run_all.sh lab` on the work folder; yields (base URL, token, the URL it printed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # its own Jupyter data folder (runtime files, the trust database): nothing of the user's is read or changed
    env = {**_tiny_env(), "JUPYTER_TOKEN": os.urandom(12).hex(), "JUPYTER_DATA_DIR": str(workdir / "jupyter-data")}
    log = open(workdir / "lab.log", "w")
    proc = subprocess.Popen([str(ROOT / "run_all.sh"), "--skip-install", "lab", "--no-browser", "--port", str(port), "--",
                             f"--ServerApp.root_dir={workdir}",  # and the layout it remembers stays there too
                             f"--LabApp.workspaces_dir={workdir / 'lab-workspaces'}",
                             f"--LabApp.user_settings_dir={workdir / 'lab-settings'}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={env['JUPYTER_TOKEN']}", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(workdir / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        printed = re.search(r"open (http\S+)", (workdir / "lab.log").read_text())
        yield base, env["JUPYTER_TOKEN"], printed and printed.group(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server stops its kernels
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _cell_outputs(path: Path) -> list[list[dict]] | None:
    """Each code cell's outputs as the saved file holds them; None while JupyterLab is still writing the file
    (a read can catch it empty or half-written)."""
    try:
        nb = nbformat.read(path, as_version=4)
    except (nbformat.reader.NotJSONError, ValueError, OSError):
        return None
    return [c.outputs for c in nb.cells if c.cell_type == "code"]


def _saved_outputs(path: Path, timeout: float = 30) -> list[list[dict]]:
    """The saved notebook's outputs once every cell after the first two has some (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        outputs = _cell_outputs(path)
        if outputs is not None and (all(outputs[2:]) or time.monotonic() > deadline):
            return outputs
        if time.monotonic() > deadline + 10:
            raise AssertionError(f"{path}: still not readable {timeout + 10:.0f} s after saving")
        time.sleep(0.5)


def _wait_for_run_all(page, timeout: float = 300) -> None:
    """Until every code cell shows an execution count, or the run stopped (a cell failed: the rest stay `[ ]`)."""
    prompts = "() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())"
    started = stopped = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ps = page.evaluate(prompts)
        if ps and all(re.fullmatch(r"\[\d+\]:", p) for p in ps):
            return
        started = started or "[*]:" in ps
        stopped = stopped + 1 if started and "[*]:" not in ps else 0
        if stopped >= 3:  # no cell queued or running for 3 s
            return
        time.sleep(1)
    raise AssertionError(f"Run All did not finish in {timeout:.0f} s: prompts {page.evaluate(prompts)}")


def test_notebook_05_in_jupyterlab(browser_path, workdir, lab):
    from playwright.sync_api import expect, sync_playwright

    from nbformat.sign import NotebookNotary

    stored = executed_box_notebook(workdir)  # before the server's kernels load the machine
    executed = nbformat.read(stored, as_version=4)
    (workdir / "jupyter-data").mkdir(exist_ok=True)
    NotebookNotary(data_dir=str(workdir / "jupyter-data")).sign(executed)  # as ./run_all.sh does (`jupyter trust`)
    base, token, printed = lab
    assert printed == f"http://localhost:{base.rsplit(':', 1)[1]}/lab?token={token}"  # the URL it prints (another folder: /lab)
    SHOTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
            expect(page.locator(".jp-KernelName").first).to_contain_text("CoZyRAG (.venv)", timeout=90_000)
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first).to_be_attached(timeout=90_000)

            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            _wait_for_run_all(page)
            page.keyboard.press("Control+s")  # saved, the outputs can be read as the notebook holds them
            outputs = _saved_outputs(workdir / NOTEBOOK)
            errors = [f"cell {i}: {o['ename']}: {o['evalue']}" for i, outs in enumerate(outputs) for o in outs
                      if o["output_type"] == "error"]
            assert not errors, errors
            first = "".join(o.get("text", "") for o in outputs[1])
            assert first.startswith("preset tiny: the settings of the most recent run"), first

            # every plot shows inline: recall@k, EM/F1, latency, training curves
            assert page.locator(".jp-Notebook .jp-RenderedImage img").count() >= 4
            box = page.locator(".jp-Notebook .widget-vbox").filter(has=page.locator(".widget-text")).first
            box.scroll_into_view_if_needed()
            expect(box).to_contain_text("Q: Who was Albert Einstein?")  # the box opens on the default answer
            field = box.locator(".widget-text input")
            field.fill(QUESTION)
            expect(box).to_contain_text("press Enter")  # the answer below is still the old question's
            field.press("Enter")
            expect(box).to_contain_text(f"Q: {QUESTION}", timeout=60_000)
            expect(box.locator("li")).not_to_have_count(0)  # the scored passages
            expect(box.locator("h3")).to_have_count(1)  # the answer
            assert "error:" not in box.inner_text()
            news = page.get_by_role("button", name="No", exact=True)  # JupyterLab's "notified about news?" toast
            if news.count():
                news.first.click()
            box.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "05_question_box.png"))
            plot = page.locator(".jp-Notebook .jp-RenderedImage img").first
            plot.scroll_into_view_if_needed()
            expect(plot).to_be_in_viewport()
            page.wait_for_timeout(1000)  # content-visibility: let the cells around it paint
            page.screenshot(path=str(SHOTS / "05_plots.png"))

            # an executed copy (papermill, as ./run_all.sh writes outputs/notebooks/) shows the box from its file
            copy = browser.new_page(viewport={"width": 1400, "height": 1000})
            copy.goto(f"{base}/lab/workspaces/stored/tree/{stored.name}?token={token}")  # a workspace with it alone
            saved = copy.locator(".jp-Notebook .widget-vbox").filter(has=copy.locator(".widget-text")).first
            expect(saved).to_contain_text("Q: Who wrote it?", timeout=90_000)
            expect(saved.locator("mark")).to_have_text("Ann wrote it.")
            copy.screenshot(path=str(SHOTS / "05_executed_copy.png"))
        finally:
            browser.close()
    print(f"browser part: {time.monotonic() - t0:.0f} s; screenshots in {SHOTS}")
