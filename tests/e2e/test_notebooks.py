"""The notebooks: committed without outputs, and one run in a real JupyterLab in
headless Chromium. (The notebooks themselves run under nbval: `--nbval-lax notebooks/`.)"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from labkit.utils import free_port

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What a sandboxed CI box allows: no GPU, no sandbox, nothing fetched from the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_every_notebook_is_committed_without_outputs():
    assert len(NOTEBOOKS) >= 6
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{path.name}: clear the outputs"
                )
        assert "widgets" not in nb.metadata, f"{path.name}: saved widget state"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs one cell tagged 'parameters'"


def _with_parameters(src: Path, dst: Path, **params) -> None:
    """papermill's way: a cell after the 'parameters' cell overrides its values."""
    nb = nbformat.read(src, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)
    nbformat.write(nb, dst)


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on loopback with token auth, its own settings and workspace dirs;
    yields (base URL, token, root dir)."""
    root, token, port = tmp_path / "root", secrets.token_hex(16), free_port()
    root.mkdir()
    # Every cell in the DOM (no windowing), so the test sees every output; no news pop-up.
    for plugin, values in {
        "notebook-extension/tracker": {"windowingMode": "none"},
        "apputils-extension/notification": {"fetchNews": "false"},
    }.items():
        path = tmp_path / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
            f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
            # CI containers run as root; nothing may reach the network.
            "--allow-root",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "rt")),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "jupyterlab.log").read_text()
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not start"
                time.sleep(0.5)
        yield base, token, root
    finally:
        proc.terminate()  # the server shuts its kernels down on SIGTERM
        proc.wait(timeout=60)
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)"
)
def test_sweep_notebook_runs_in_jupyterlab(jupyterlab, tiny_ckpts, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token, root = jupyterlab
    # The sweep notebook on the tiny checkpoint: its charts and widgets, in seconds.
    _with_parameters(
        REPO / "notebooks" / "02_sweep.ipynb",
        root / "sweep.ipynb",
        MODEL=str(tiny_ckpts["llama"]),
        BATCH_SIZES=[1, 2],
        INPUT_LENS=[8, 16],
        OUTPUT_LENS=[4],
        NUM_ITERS=1,
    )
    shots = Path(os.environ.get("LABKIT_SCREENSHOT_DIR", tmp_path))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1800})
            page.goto(f"{base}/lab/tree/sweep.ipynb?token={token}")
            # The kernel must be up before Run All, or JupyterLab asks which kernel to start.
            page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(
                timeout=120_000
            )
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            # Done when every code cell shows an execution count ("[n]:", not "[*]:").
            page.wait_for_function(
                """() => {
                    const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                    return p.length > 0 && p.every(e => /\\[\\d+\\]/.test(e.textContent)); }""",
                timeout=300_000,
            )
            page.wait_for_selector(".jp-OutputArea .js-plotly-plot", timeout=60_000)
            plots = page.locator(".jp-OutputArea .js-plotly-plot").count()
            buttons = page.locator(".jp-OutputArea .jupyter-widgets button", has_text="Run").count()
            errors = page.locator(
                ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                has_text="Traceback",
            ).all_inner_texts()
            page.locator(".jp-Cell").first.scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "jupyterlab_sweep.png"))
            page.locator(".jp-OutputArea .js-plotly-plot").nth(
                6
            ).scroll_into_view_if_needed()  # the roofline
            page.screenshot(path=str(shots / "jupyterlab_charts.png"))
            # The dashboard works through the real front end: Run, and its chart fills in.
            page.locator(".jp-OutputArea .jupyter-widgets button", has_text="Run").click()
            page.get_by_text("done: 4 points").wait_for(timeout=120_000)
            page.screenshot(path=str(shots / "jupyterlab_dashboard.png"))
            print(f"screenshots: {shots}/jupyterlab_{{sweep,charts,dashboard}}.png")
            page.keyboard.press("Control+s")  # the outputs as saved: no error among them
            page.wait_for_timeout(2000)
        finally:
            browser.close()
    assert not errors, errors
    # The live chart, five sweep charts, the comparison, the dashboard's chart.
    assert plots >= 8, plots
    assert buttons == 1  # the dashboard rendered as widgets
    saved = nbformat.read(root / "sweep.ipynb", as_version=4)
    outputs = [o for c in saved.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and not [o for o in outputs if o.output_type == "error"]


def test_a_saved_notebook_keeps_static_charts(tiny_ckpts, tmp_path):
    """Executed, saved and reloaded (nbclient, nbformat): the live chart and the dashboard leave
    static plotly figures behind, and the progress is HTML text, not a widget that a saved
    notebook (nbconvert, GitHub) can't draw."""
    from nbclient import NotebookClient

    model = str(tiny_ckpts["llama"])
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(src)
        for src in (
            f"import labkit\nr = labkit.sweep({model!r}, batch_sizes=[1, 2], input_lens=[8], "
            "output_lens=[4], num_iters=1)",
            f"d = labkit.dashboard({model!r}, batch_sizes=[1, 2], input_lens=[8], "
            "output_lens=[3])\nd",
            "d.run();",  # what the Run button does, here in the cell
        )
    ]
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        store_widget_state=False,
    ).execute()
    nbformat.write(nb, tmp_path / "saved.ipynb")
    saved = nbformat.read(tmp_path / "saved.ipynb", as_version=4)
    errors = [o for c in saved.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    plotly = "application/vnd.plotly.v1+json"
    widget = "application/vnd.jupyter.widget-view+json"

    def outputs(cell):
        return [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]

    sweep_out = outputs(saved.cells[0])
    # The live chart became a static figure with its two points; no widget is left.
    static = [o for o in sweep_out if plotly in o.data]
    assert len(static) == 1 and [len(t["x"]) for t in static[0].data[plotly]["data"]] == [2]
    assert "text/html" in static[0].data
    assert not [o for o in sweep_out if widget in o.data]
    assert any(
        "2 / 2 points" in o.data.get("text/html", "") and "done" in o.data["text/html"]
        for o in sweep_out
    )
    # The dashboard: its widget (drawn only where widgets run) and, after the run, its three
    # charts as static figures.
    dash_out = outputs(saved.cells[1])
    assert [o for o in dash_out if widget in o.data]
    assert len([o for o in dash_out if plotly in o.data]) == 3
