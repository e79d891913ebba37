"""``ctxaware report``: discovery, numbers, self-contained HTML, Markdown twin, and (marked ``browser``) Chromium.

The run directories are written with the package's own writers (`ResultsWriter`, `write_json_atomic`) in
the layouts the commands use; the numbers the report must show are computed by hand here.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ctxaware.cli import main as cli_main
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import ResultsWriter, write_json_atomic
from ctxaware.reporting.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# chat recall per (length, depth) and plain recall on the same cells: means 75% and 25%, paired diff 50 pp
CHAT = {(200, 0.0): 1.0, (200, 100.0): 1.0, (400, 0.0): 1.0, (400, 100.0): 0.0}
PLAIN = {(200, 0.0): 0.0, (200, 100.0): 0.0, (400, 0.0): 1.0, (400, 100.0): 0.0}
SCORES = [0.1, 0.55, 0.65, 0.75, 0.85]  # Table 3: > 0.5: 4/5, > 0.6: 3/5, > 0.7: 2/5, > 0.8: 1/5


def make_runs(root: Path) -> list[Path]:
    nih = root / "nih" / "smollm2-135m-instruct"
    with ResultsWriter(
        nih, {"model": "default", "lengths": [200, 400]}, ("condition", "length", "depth")
    ) as w:
        for cond, table in (("chat", CHAT), ("plain", PLAIN)):
            for (length, depth), rec in table.items():
                w.write({"model": "smollm2-135m-instruct", "condition": cond, "mode": cond, "template": 1,
                         "length": length, "depth": depth, "recall": rec, "exact": rec, "empty": 0.0})  # fmt: skip
    write_json_atomic(root / "nih" / "summary.json", {"smollm2-135m-instruct": {"chat": {}, "plain": {}}})
    conds = {
        "plain": {"head": 5, "raw": {"sink": 0.2, "user": 0.7, "assistant": 0.1}, "paper": {"user": 0.7}},
        "chat": {"head": 5, "raw": {"sink": 0.1, "user": 0.85, "assistant": 0.05}, "paper": {"user": 0.9}},
    }
    write_json_atomic(
        root / "attention" / "allocation.json",
        {"model": "smollm2-135m-instruct", "layer": 15, "n_prompts": 4, "conditions": conds},
    )
    score = root / "score"
    score.mkdir()
    (score / "scores.jsonl").write_text(
        "".join(
            json.dumps({"conversation_id": str(i), "source_row": i, "turn": 0, "score": s}) + "\n"
            for i, s in enumerate(SCORES)
        )  # fmt: skip
    )
    write_json_atomic(score / "scores.summary.json", {"n_turns": 5, "n_scored": 5, "mean_score": 0.58})
    write_json_atomic(
        root / "train" / "train_summary.json",
        {"global_step": 8, "train_loss": 1.5, "wall_seconds": 42.0, "losses": [{"step": 1, "loss": 2.0}, {"step": 8, "loss": 1.0}],
         "context_reliance": [{"step": 0, "p_s": 0.5, "p_o": 0.3}, {"step": 8, "p_s": 0.25, "p_o": 0.5}]},
    )  # fmt: skip
    metric = {"mean": 0.5, "ci_low": 0.25, "ci_high": 0.75, "n": 8}
    write_json_atomic(
        root / "eval" / "summary.json",
        {"config": {"model": "default"}, "results": {"default": {"chat": {"squad": {"kind": "qa", "n": 8, "metrics": {"containment": metric}}}}}},
    )  # fmt: skip
    u = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 8}
    coef = {"coef": -0.3, "ci_low": -0.4, "ci_high": -0.2, "spearman": -0.25}
    write_json_atomic(  # the format `ctxaware stages` writes
        root / "stages" / "summary.json",
        {"checkpoints": ["base", "sft"], "usage": {"base": {"p_s": u}, "sft": {"p_s": u}},
         "sensitivity": {"base": {"p_s": {"context_length": coef}}, "sft": {"p_s": {"context_length": coef}}},
         "head_change": {"sft - base": {"comparable": False, "reason": "layer x head shapes differ"}},
         "config": {"checkpoints": ["base=gemma3-270m", "sft=default"], "model": "default"}},
    )  # fmt: skip
    write_json_atomic(root / "heads" / "heads.json", {"15": [5, 6]})
    write_json_atomic(
        root / "select" / "selection.json",
        {"beta": 0.6, "n_scored": 5, "n_selected": 3, "table3": {"0.6": 0.6}},
    )
    run = {
        "train": {"context_reliance": [{"step": 0, "p_s": 0.5, "p_o": 0.3}]},
        "eval": {"squad": {"kind": "qa", "n": 8, "metrics": {"containment": metric}}},
    }
    write_json_atomic(root / "exp" / "comparison.json", {"vanilla": run, "+indicator b=0.6": run})
    (root / "mystery").mkdir()
    (root / "mystery" / "notes.txt").write_text("not a ctxaware result")
    return [
        root / n
        for n in ("nih", "attention", "score", "train", "eval", "stages", "heads", "select", "exp", "mystery")
    ]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs, self.links, self.kinds, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("href", "src", "action", "poster", "data"):
            if k in a and tag != "img":
                self.links.append(a[k])
        if tag == "section":
            self.kinds.append(a.get("data-kind"))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, _Page]:
    root = tmp_path_factory.mktemp("runs")
    runs = make_runs(root)
    write_json_atomic(root / "nih" / "provenance.json", {"ctxaware_version": "9.9.9", "git_commit": "abc123",
                                                        "started": "T0", "finished": "T1", "seconds": 12.0})  # fmt: skip
    html = write_report(runs, root / "out" / "report.html")
    page = _Page()
    page.feed(html.read_text())
    return html, page


def test_every_kind_gets_a_section_and_unknown_is_listed(report):
    _, page = report
    for kind in (
        "nih",
        "attention",
        "heads",
        "scores",
        "selection",
        "train",
        "eval",
        "experiment",
        "stages",
        "unknown",
    ):
        assert kind in page.kinds, kind
    text = " ".join(page.text)
    assert "mystery" in text and "notes.txt" in text


def test_stages_section_reads_the_stages_summary(report):
    text = " ".join(report[1].text)
    assert "-0.30 [-0.40, -0.20]" in text  # the sensitivity whose CI excludes zero
    assert "0.500 [0.400, 0.600]" in text and "not comparable: layer x head shapes differ" in text
    assert "base=gemma3-270m, sft=default" in text  # the checkpoints, not the config's unused `model`


def test_images_are_embedded_pngs_and_nothing_is_external(report):
    html, page = report
    assert len(page.imgs) >= 8
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == PNG_MAGIC
        width, height = struct.unpack(">II", png[16:24])  # IHDR
        assert 400 <= width <= 1400 and height >= 250  # fits a page, readable
    assert all(link.startswith("#") for link in page.links), page.links  # only in-page anchors
    assert "<script" not in html.read_text().lower()


def test_numbers_match_hand_computation(report):
    text = " ".join(report[1].text)
    assert "75.0" in text and "25.0" in text  # chat and plain recall means
    assert "Paired difference chat − plain: 50.0" in text  # (0 + 1 + 0 + 0 ... ) matched per cell: 2/4
    assert re.search(
        r"scores\.jsonl\s*\|?\s*0\.800\s*\|?\s*0\.600\s*\|?\s*0\.400\s*\|?\s*0\.200", " ".join(text.split())
    )
    md = report[0].with_suffix(".md").read_text()
    attention = next(sec for sec in md.split("\n## ") if sec.startswith("Attention per role"))
    assert "| raw mass per role | user | 0.7 | 0.85 | 0.15 |" in attention  # chat − plain user share, its row


def test_provenance_recorded_or_marked_missing(report):
    text = " ".join(report[1].text)
    assert "9.9.9 @ abc123" in text and "12 s" in text  # from nih/provenance.json
    # issue 27 §3: a parent's record times the whole run, and says so in the section of one model
    assert f"12 s (the whole run in {report[0].parents[1] / 'nih'})" in text
    assert "version and commit not recorded by this command" in text  # the other sections
    assert "42 s" in text  # training wall_seconds


def test_markdown_twin_references_written_pngs(report):
    html, _ = report
    md = html.with_suffix(".md").read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert refs and all((html.parent / r).read_bytes()[:8] == PNG_MAGIC for r in refs)
    assert "## Directories not understood" in md


def test_cli_report_and_missing_directory(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "x.bin").write_bytes(b"\0")
    assert cli_main(["report", str(tmp_path / "empty_run"), "--output", str(tmp_path / "r.html")]) == 0
    assert "x.bin" in (tmp_path / "r.html").read_text()
    with pytest.raises(CtxawareError, match="not a directory"):
        write_report([tmp_path / "nope"], tmp_path / "r2.html")


def test_nih_heatmap_is_large_enough_to_read(tmp_path):
    from ctxaware.core.plotting import nih_heatmap

    png = nih_heatmap([[1.0, 0.5]] * 2, [200, 400], [0, 100], tmp_path / "h.png", "t").read_bytes()
    assert struct.unpack(">II", png[16:24])[0] >= 600  # was 414 px wide


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]  # fmt: skip
PROBE = """<script>
var errs = [];
window.addEventListener('error', function (e) { errs.push(String(e.message || (e.target && e.target.src) || e)); }, true);
var ce = console.error; console.error = function () { errs.push([].join.call(arguments, ' ')); ce.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = [].map.call(document.images, function (i) { return [i.complete, i.naturalWidth]; });
  var p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({imgs: imgs, errs: errs}); document.body.appendChild(p);
});
</script>"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium (apt-get install -y chromium)")
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
def test_report_renders_in_chromium(report, tmp_path):
    html, page = report
    shot = tmp_path / "shot.png"
    r = _chromium(["--window-size=1100,3000", f"--screenshot={shot}", html.as_uri()], tmp_path / "p1")
    assert shot.read_bytes()[:8] == PNG_MAGIC
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console  # no console errors or CSP violations on the report itself
    # the same page with a probe that writes each image's load state into the DOM
    probe = tmp_path / "probe.html"
    text = html.read_text().replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probe.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    r = _chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path / "p2")
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert m, r.stdout[-2000:]
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["errs"] == []
    assert len(result["imgs"]) == len(page.imgs)
    assert all(complete and width > 0 for complete, width in result["imgs"]), result["imgs"]


def test_report_inside_its_run_does_not_list_itself(tmp_path):
    write_json_atomic(tmp_path / "select" / "selection.json", {"beta": 0.6, "table3": {"0.6": 0.5}})
    for _ in range(2):  # first run: the figure folder is new; second: the earlier report is there too
        html = write_report([tmp_path], tmp_path / "fresh.html").read_text()
        assert "not understood" not in html and "fresh_files" not in html


def test_unreadable_formats_are_reported_not_raised(tmp_path):
    write_json_atomic(tmp_path / "att" / "allocation.json", {"models": {"m": "not a mapping"}})
    (tmp_path / "nih").mkdir()
    (tmp_path / "nih" / "rows.jsonl").write_text('{"length": 1, "depth": 0, "recall": "high"}\n')
    html = write_report([tmp_path], tmp_path / "out" / "r.html").read_text()
    assert html.count("could not be read") == 2 and "not readable" in html


def test_plotting_changes_no_global_matplotlib_state(tmp_path):
    """Issue 26 §4: importing ctxaware and drawing a figure leave matplotlib as a notebook had it: rcParams
    unchanged (the house style applies inside each function), no backend forced, pyplot not imported."""
    import subprocess
    import sys

    code = f"""
import sys, matplotlib
snapshot = lambda: dict(dict.items(matplotlib.rcParams.copy()))  # reading "backend" itself imports pyplot
before = snapshot()
import ctxaware, ctxaware.core.plotting as P
P.line_plot({{"loss": ([0, 1, 2], [3.0, 2.0, 1.5])}}, {str(tmp_path / "f.png")!r}, "t", "step", "loss")
after = snapshot()
assert after == before, sorted(k for k in after if after[k] != before[k])
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
    from PIL import Image

    with Image.open(tmp_path / "f.png") as im:  # the figure was drawn, in the house style's size
        assert im.size == (round(6 * 130), round(3.4 * 130))


def test_bars_get_caps_only_where_there_is_a_ci(tmp_path, monkeypatch):
    """Issue 27 §3: a bar whose CI was not computed (n too small: NaN in memory, null in JSON) gets no error
    bar at all, not a zero-length cap that reads as a certain value; the NIH heatmap's colour bar is in
    percent, as its cells are."""
    from matplotlib.axes import Axes

    from ctxaware.core import plotting

    drawn = []
    real = Axes.errorbar
    monkeypatch.setattr(
        Axes, "errorbar", lambda self, x, y, **kw: drawn.append(list(x)) or real(self, x, y, **kw)
    )
    plotting.bar_chart({"a": {"chat": (0.5, 0.4, 0.6), "plain": (0.7, None, None)}, "b": {"chat": (0.2, float("nan"), float("nan"))}},
                       tmp_path / "bars.png", "t", "y")  # fmt: skip
    assert [len(x) for x in drawn] == [1]  # one bar of three has a CI
    labels = []
    real_cb = plotting.Figure.colorbar
    monkeypatch.setattr(
        plotting.Figure,
        "colorbar",
        lambda self, im, **kw: labels.append((im.get_clim(), kw.get("label"))) or real_cb(self, im, **kw),
    )
    plotting.nih_heatmap([[1.0, 0.5]], [200, 400], [50.0], tmp_path / "h.png", "t")
    assert labels == [((0.0, 100.0), "keyword recall (%)")]


def test_protocol_line_leaves_out_unset_options():
    """Issue 27 §3: the score section said ``layer=null`` for a run at layer 20; an unset option is left
    out and the layers actually used are shown."""
    from ctxaware.reporting import report as R
    from ctxaware.reporting.sections import Section

    s = Section(
        kind="scores", title="t", path=Path("."), config={"layer": None, "layers": [20], "max_tokens": 2047}
    )
    line = R._protocol(s)
    assert "layer=" not in line.replace("layers=", "") and "layers=[20]" in line and "max_tokens=2047" in line


def test_no_figure_title_runs_past_the_image(tmp_path):
    """Issue 27 section 3: a long panel title or suptitle is wrapped to its width, never cut at the edge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ctxaware.core import plotting

    long = "NIH recall by context length and needle depth for a model with a rather long name, chat+prefix"
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 2.6))
    axes = fig.subplots(1, 3)
    for ax in axes:
        ax.plot([0, 1], [0, 1])
        ax.set_title(long, fontsize=9)
    fig.suptitle(long + " " + long, fontsize=10)
    plotting._save(fig, tmp_path / "f.png")
    renderer = FigureCanvasAgg(fig).get_renderer()
    width = fig.bbox.width
    for text in [ax.title for ax in axes] + [fig._suptitle]:
        box = text.get_window_extent(renderer)
        assert box.x0 >= -1 and box.x1 <= width + 1, text.get_text()[:40]
